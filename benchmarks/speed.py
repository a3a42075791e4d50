"""Speed and memory of MoCE-IR-S and MoCE-IR against the official PyTorch figures.

    python benchmarks/speed.py [--variants s,base] [--cases eval256,eval512,train] [--runs 3]
                               [--model scan_blocks=0,remat=1]

Each case runs in its own process (so its peak resident memory is its own):
parameters, FLOPs as XLA's cost analysis counts them, compile time, eval
latency at 1x3x256x256 and 1x3x512x512 with dense and expert-skipping (sparse)
dispatch, and the train-step time at 4x3x128x128 (AdamW, L1 + 0.1 FFT + 0.01
aux, donated state) with images/s. Times are medians of --runs after one
warm-up run, with the allocator the entry points choose (tcmalloc when the
system has it, else glibc's huge-page tunable; --system_allocator: neither).
Random weights and inputs. Official figures (torch 2.13 CPU, 2
threads, same kind of machine) are printed beside ours; for the official code's
figures on this machine, run benchmarks/official_speed.py --repo PATH (a checkout
of eduardzamfir/MoCE-IR): the same cases, measured the same way.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Seconds, GB: the issue tracker's measurements of eduardzamfir/MoCE-IR on one 2-core machine.
# Machines of the same kind differ by 2x, so compare with the official code run on the same
# machine (the README's table does); these are printed for orientation only.
OFFICIAL = {
    "s": {"eval256": 2.79, "train": 5.15, "train_peak_gb": 8.25},
    "base": {"eval256": 4.16, "train": 7.23, "train_peak_gb": 12.2},
}


def parse_model_kw(text: str) -> dict:
  """``scan_blocks=0,remat=1`` -> {"scan_blocks": 0, "remat": 1} (ints, true/false, strings)."""
  out = {}
  for item in filter(None, text.split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--model: expected KEY=VALUE, got {item!r}")
    low = value.lower()
    if low in ("true", "false"):
      out[key] = low == "true"
    elif value.lstrip("-").isdigit():
      out[key] = int(value)
    else:
      out[key] = value
  return out


def _case(variant: str, case: str, runs: int, model_kw: dict) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moceir_jax import host, losses  # pylint: disable=import-outside-toplevel
  from moceir_jax import model as model_lib  # pylint: disable=import-outside-toplevel

  model = model_lib.create(model_lib.variant(variant, **model_kw))
  rng = np.random.default_rng(0)
  out = {"params": model_lib.param_count(model)}

  def timed(compiled, *args):
    jax.block_until_ready(compiled(*args))
    ts = []
    for _ in range(runs):
      t = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      ts.append(time.perf_counter() - t)
    return float(np.median(ts))

  if case.startswith("eval"):
    size = int(case[4:])
    x = jnp.asarray(rng.uniform(size=(1, size, size, 3)).astype(np.float32))
    graphdef, state = nnx.split(model)
    for dispatch in ("dense", "sparse"):
      fn = jax.jit(lambda s, x, d=dispatch: nnx.merge(graphdef, s)(x, dispatch=d).image)
      t = time.perf_counter()
      lowered = fn.lower(state, x)
      compiled = lowered.compile()
      out[f"{dispatch}_compile_s"] = time.perf_counter() - t
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      out[f"{dispatch}_gflops"] = float(cost.get("flops", float("nan"))) / 1e9
      out[f"{dispatch}_s"] = timed(compiled, state, x)
  else:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(2e-4, weight_decay=0.01)
    opt_state = tx.init(params)
    x = jnp.asarray(rng.uniform(size=(4, 128, 128, 3)).astype(np.float32))

    def step(params, opt_state, x, key):
      def loss_fn(p):
        o = nnx.merge(graphdef, p, rest)(x, train=True, noise_key=key)
        return losses.l1(o.image, x) + 0.1 * losses.fft_l1(o.image, x) + 0.01 * o.aux_loss
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x,
                                                          jax.random.key(0)).compile()
    out["compile_s"] = time.perf_counter() - t
    out["compile_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    out["buffers_gb"] = compiled.memory_analysis().temp_size_in_bytes / 1e9
    # As training does (training.compile_step): JAX's caches and the compiler's freed heap go.
    jax.clear_caches()
    host.release_free_memory()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["gflops"] = float(cost.get("flops", float("nan"))) / 1e9
    state = [params, opt_state]
    ts = []
    for i in range(runs + 1):
      t = time.perf_counter()
      state[0], state[1], loss = compiled(state[0], state[1], x, jax.random.key(i))
      jax.block_until_ready(loss)
      ts.append(time.perf_counter() - t)
    out["train_s"] = float(np.median(ts[1:]))
    out["images_per_s"] = 4 / out["train_s"]
  out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variants", default="s,base")
  ap.add_argument("--cases", default="eval256,eval512,train")
  ap.add_argument("--runs", type=int, default=3, help="timed runs per case, after one warm-up")
  ap.add_argument("--system_allocator", action="store_true",
                  help="run the cases with plain glibc malloc (see moceir_jax/host.py)")
  ap.add_argument("--model", default="",
                  help="model config overrides, e.g. scan_blocks=0 or remat=1 (before/after)")
  ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: VARIANT CASE
  args = ap.parse_args()
  if args.one:
    print(json.dumps(_case(args.one[0], args.one[1], args.runs, parse_model_kw(args.model))))
    return
  from moceir_jax import host  # pylint: disable=import-outside-toplevel
  env = (None if args.system_allocator else host.allocator_env()) or dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile times are measured: always compile
  # XLA's cost analysis counts a while loop's body once, not once per iteration.
  flops_note = (" (scanned runs counted once)" if parse_model_kw(args.model).get("scan_blocks")
                else "")
  for variant in args.variants.split(","):
    for case in args.cases.split(","):
      r = subprocess.run([sys.executable, __file__, "--one", variant, case, "--runs",
                          str(args.runs), "--model", args.model],
                         capture_output=True, text=True, env=env)
      if r.returncode != 0:
        print(f"{variant} {case}: failed: {r.stderr.strip().splitlines()[-1][:300]}", flush=True)
        continue
      res = json.loads(r.stdout.strip().splitlines()[-1])
      off = OFFICIAL.get(variant, {})
      if case == "train":
        ref = (f" | official (issue's machine) {off['train']:.2f} s, "
               f"{off['train_peak_gb']:.2f} GB" if off else "")
        print(f"{variant} train 4x3x128x128: {res['train_s']:.2f} s/step "
              f"({res['images_per_s']:.2f} img/s), {res['gflops']:.0f} GFLOP{flops_note}, compile "
              f"{res['compile_s']:.0f} s, peak {res['peak_gb']:.2f} GB (compiler "
              f"{res['compile_peak_gb']:.2f}, step buffers {res['buffers_gb']:.2f}){ref}",
              flush=True)
      else:
        ref = (f" | official (issue's machine) {off['eval256']:.2f} s"
               if off and case == "eval256" else "")
        print(f"{variant} ({res['params']:,} params) {case}: dense {res['dense_s']:.2f} s "
              f"({res['dense_gflops']:.1f} GFLOP{flops_note}, compile {res['dense_compile_s']:.0f} s), "
              f"sparse {res['sparse_s']:.2f} s (compile {res['sparse_compile_s']:.0f} s), "
              f"peak {res['peak_gb']:.2f} GB{ref}", flush=True)


if __name__ == "__main__":
  main()
