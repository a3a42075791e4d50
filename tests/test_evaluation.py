"""Evaluation pieces: expert cost, per-set scores and routing, official test-time noise."""

import numpy as np
import pytest

import ml_collections
from moceir_jax import datasets, evaluation
from moceir_jax import model as model_lib
from moceir_jax.inference import Restorer


@pytest.fixture(scope="module")
def micro():
  return model_lib.create(model_lib.moceir_micro(), seed=1)


def test_expert_flops_grow_with_expert_size(micro):
  flops = evaluation.expert_flops(micro, size=32)
  assert list(flops) == micro.cfg.block_names()
  for f in flops.values():
    assert len(f) == micro.cfg.num_experts and all(a < b for a, b in zip(f, f[1:]))


def test_evaluate_set_scores_routes_and_official_noise(micro, tmp_path):
  from skimage import data
  from PIL import Image
  path = tmp_path / "astronaut.png"
  Image.fromarray(data.astronaut()[100:164, 200:270]).save(path)  # 64x70: padded and cropped
  pairs = [datasets.Pair(clean=str(path), degraded=None, task="denoise_25")]
  flops = evaluation.expert_flops(micro, size=32)
  summary, first = evaluation.evaluate_set(Restorer(micro, bucket=2), pairs, 0, flops,
                                           save_dir=str(tmp_path / "out"))
  assert summary["images"] == 1 and first[1].shape == (64, 70, 3)
  chosen = summary["per_image"][0]["experts"]
  for block, usage in summary["expert_usage"].items():
    assert usage[chosen[block][0]] == 1.0
    share = flops[block][chosen[block][0]] / max(flops[block])
    assert summary["compute_share"][block] == pytest.approx(share)
  assert (tmp_path / "out" / "astronaut.png").exists()
  # Deterministic by default; the official protocol adds router noise (needs a key).
  again, _ = evaluation.evaluate_set(Restorer(micro, bucket=2), pairs, 0, flops)
  assert again["psnr"] == summary["psnr"]
  config = ml_collections.ConfigDict(dict(
      eval=dict(benchmarks=(), save_images=False, official_noise=False, heldout=True,
                heldout_crop=32, max_images=1, tile=0),
      data=dict(task_set="synthetic", root="", clean="builtin", tasks=("denoise_25",))))
  res = evaluation.evaluate(config, str(tmp_path), model=micro, official_noise=True)
  assert set(res) == {"heldout/denoise_25"} and res["heldout/denoise_25"]["images"] == 1
  assert micro.cfg.routing_noise == "train"  # the caller's model is left as it was
  assert (tmp_path / "eval" / "results.json").exists()
