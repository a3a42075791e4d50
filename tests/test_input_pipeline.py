"""The Grain pipeline: determinism across workers, exact resume, mixing, crops, bad files."""

import os
import threading

import numpy as np
import pytest
from PIL import Image
from skimage import data

from moceir_jax import datasets, input_pipeline as ip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
  clean_dir, in_dir, tg_dir = root / "clean", root / "in", root / "gt"
  for d in (clean_dir, in_dir, tg_dir):
    d.mkdir()
  for i, p in enumerate(photos):
    img = Image.fromarray(p[:96, :120])
    img.save(clean_dir / f"{i}.png")
    img.save(in_dir / f"{i}.png")  # a "paired" set whose degraded image equals the clean
    img.save(tg_dir / f"{i}.png")
  Image.fromarray(data.camera()[:20, :24]).save(clean_dir / "small_gray.png")
  return root


def _sources(folders):
  clean = [datasets.Pair(clean=p, degraded=None, task="denoise_25")
           for p in datasets.clean_folder(str(folders / "clean"))]
  pairs = [datasets.Pair(clean=t, degraded=i, task="derain") for i, t in datasets.pair_folders(
      sorted(str(folders / "in" / n) for n in os.listdir(folders / "in")),
      sorted(str(folders / "gt" / n) for n in os.listdir(folders / "gt")), "test")]
  return [ip.TaskSource("denoise_25", tuple(clean), 1.0), ip.TaskSource("derain", tuple(pairs), 1.0)]


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batches_shapes_and_aligned_crops(folders):
  it = iter(ip.train_dataset(_sources(folders), batch_size=4, patch=32, seed=0))
  for b in _take(it, 4):
    assert b["degraded"].shape == b["clean"].shape == (4, 32, 32, 3)
    assert b["degraded"].dtype == np.float32 and b["task"].dtype == np.int32
    for n in range(4):
      if b["task"][n] == 1:  # paired set with identical images: crops/flips must align
        np.testing.assert_array_equal(b["degraded"][n], b["clean"][n])
      else:  # synthetic noise sigma=25
        assert 0.05 < np.std(b["degraded"][n] - b["clean"][n]) < 0.15


def test_workers_give_identical_batches(folders):
  srcs = _sources(folders)
  ref = _take(iter(ip.train_dataset(srcs, batch_size=3, patch=32, seed=5)), 3)
  par = _take(iter(ip.train_dataset(srcs, batch_size=3, patch=32, seed=5, worker_count=2)), 3)
  for a, b in zip(ref, par):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_iterator_state_restores_exactly(folders):
  ds = ip.train_dataset(_sources(folders), batch_size=2, patch=32, seed=1)
  it = iter(ds)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 3)
  resumed = iter(ds)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 3)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_mixing_follows_weights_and_shards_differ(folders):
  srcs = _sources(folders)
  weighted = [ip.TaskSource(s.task, s.pairs, w) for s, w in zip(srcs, (1.0, 3.0))]
  it = iter(ip.train_dataset(weighted, batch_size=8, patch=16, seed=0, augment=False))
  tasks = np.concatenate([b["task"] for b in _take(it, 25)])
  assert abs(np.mean(tasks == 1) - 0.75) < 0.1
  s0 = next(iter(ip.train_dataset(srcs, batch_size=4, patch=16, seed=0, shard_count=2)))
  s1 = next(iter(ip.train_dataset(srcs, batch_size=4, patch=16, seed=0, shard_index=1,
                                  shard_count=2)))
  assert not np.array_equal(s0["clean"], s1["clean"])


def test_official_weights_are_repeats_times_size():
  pairs = [datasets.Pair(clean=f"{i}.png", degraded=None, task="derain") for i in range(3)]
  assert ip.TaskSource.official("derain", pairs).weight == 360.0


def test_flip_rotate_covers_the_eight_symmetries():
  x = np.arange(9).reshape(3, 3)
  outs = {ip.flip_rotate(x, m).tobytes() for m in range(8)}
  assert len(outs) == 8 and ip.flip_rotate(x, 0).tobytes() == x.tobytes()


def test_small_images_are_padded_not_rejected():
  rng = np.random.default_rng(0)
  a = np.random.default_rng(1).uniform(size=(5, 7, 3)).astype(np.float32)
  d, c = ip.random_crop(a, a.copy(), 16, rng)
  assert d.shape == c.shape == (16, 16, 3)


def test_bad_files_fail_with_their_path_or_are_skipped(folders, tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"broken")
  good = datasets.clean_folder(str(folders / "clean"))[0]
  src = [ip.TaskSource("denoise_15", (datasets.Pair(str(bad), None, "denoise_15"),
                                      datasets.Pair(good, None, "denoise_15")), 1.0)]
  with pytest.raises(Exception, match="bad.png"):
    _take(iter(ip.train_dataset(src, batch_size=2, patch=16, on_error="fail")), 2)
  batches = _take(iter(ip.train_dataset(src, batch_size=2, patch=16, on_error="skip")), 4)
  assert all(b["clean"].shape == (2, 16, 16, 3) for b in batches)
  assert sum(int(b["skipped"].sum()) for b in batches) >= 1
  with pytest.raises(ValueError, match="unknown degradation 'fog'"):
    ip.train_dataset([ip.TaskSource("fog", (datasets.Pair(good, None, "fog"),), 1.0)],
                     batch_size=1)


def test_eval_samples_are_whole_and_seeded(mini_root):
  pairs = datasets.benchmark_pairs(mini_root, "denoise_25")[:2]
  a, b = list(ip.eval_samples(pairs)), list(ip.eval_samples(pairs))
  assert [s["name"] for s in a] == [os.path.basename(p.clean) for p in pairs]
  assert a[0]["degraded"].shape == a[0]["clean"].shape and a[0]["clean"].shape[:2] in (
      (321, 481), (481, 321))
  np.testing.assert_array_equal(a[0]["degraded"], b[0]["degraded"])
  assert abs(np.std(a[0]["degraded"] - a[0]["clean"]) * 255 - 25) < 3
  rain = list(ip.eval_samples(datasets.benchmark_pairs(mini_root, "derain")))
  assert len(rain) == 2 and rain[0]["task"] == "derain"


def test_synthetic_sources_cover_every_task(folders):
  clean = datasets.clean_folder(str(folders / "clean"))
  tasks = ["denoise_50", "derain", "dehaze", "deblur", "lowlight"]
  srcs = ip.synthetic_sources(clean, tasks)
  it = iter(ip.train_dataset(srcs, batch_size=10, patch=24, seed=3))
  seen = np.concatenate([b["task"] for b in _take(it, 3)])
  assert set(seen.tolist()) == set(range(len(tasks)))
  with pytest.raises(ValueError, match="unknown task set 'aio4'"):
    ip.official_sources(str(folders), "aio4")


TFDS_DIR = os.path.join(os.path.dirname(__file__), "data", "tfds")


def test_tfds_source_reads_without_tensorflow():
  # tests/data/tfds holds a 3-image TFDS dataset (ArrayRecord, Image feature)
  # written by tests/data/tfds/make_moceir_tiny_clean.py; reading needs no TF.
  import sys  # pylint: disable=import-outside-toplevel
  pytest.importorskip("tensorflow_datasets")
  refs = datasets.tfds_images("moceir_tiny_clean", data_dir=TFDS_DIR)
  assert [r.index for r in refs] == [0, 1, 2]
  np.testing.assert_allclose(ip.read_clean(refs[0]), data.astronaut()[::8, ::8] / 255.0,
                             atol=1e-6)
  srcs = ip.synthetic_sources(refs, ["denoise_25", "dehaze"])
  batches = _take(iter(ip.train_dataset(srcs, batch_size=4, patch=32, seed=0)), 3)
  assert batches[0]["clean"].shape == (4, 32, 32, 3)
  threaded = _take(iter(ip.train_dataset(srcs, batch_size=4, patch=32, seed=0,
                                         worker_count=2)), 3)
  for a, b in zip(batches, threaded):
    np.testing.assert_array_equal(a["degraded"], b["degraded"])
  assert set(np.concatenate([b["task"] for b in batches]).tolist()) <= {0, 1}
  assert "tensorflow" not in sys.modules


def test_tfds_missing_dataset_is_explained():
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(datasets.LayoutError, match="'no_such_set'.*never downloads"):
    datasets.tfds_images("no_such_set", data_dir=TFDS_DIR)
  with pytest.raises(datasets.LayoutError, match=r"no feature 'img'; features: \['image', 'name'\]"):
    datasets.tfds_images("moceir_tiny_clean", data_dir=TFDS_DIR, key="img")


def test_processes_together_load_exactly_the_single_process_batches(folders):
  srcs = _sources(folders)
  whole = next(iter(ip.train_dataset(srcs, batch_size=4, patch=16, seed=3)))
  parts = [next(iter(ip.train_dataset(srcs, batch_size=2, patch=16, seed=3, shard_index=i,
                                      shard_count=2))) for i in range(2)]
  for key in ("degraded", "clean", "task"):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_decoded_images_are_cached_read_only_within_budget_and_change_nothing(folders,
                                                                              monkeypatch):
  srcs = _sources(folders)
  uncached = _take(iter(ip.train_dataset(srcs, batch_size=4, patch=16, seed=2, cache_mb=0)), 6)
  decodes = []
  real = ip.read_clean
  monkeypatch.setattr(ip, "read_clean", lambda ref: decodes.append(ref) or real(ref))
  cached = _take(iter(ip.train_dataset(srcs, batch_size=4, patch=16, seed=2)), 6)
  for a, b in zip(uncached, cached):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert decodes  # the stream above went through the cache
  # One loader (Grain's reader threads may race to decode a file while it is
  # first cached, and the stream above may still be prefetching, so count this
  # thread's decodes only): each file is decoded once.
  decodes.clear()
  here = threading.get_ident()
  monkeypatch.setattr(ip, "read_clean",
                      lambda ref: (threading.get_ident() == here and decodes.append(ref)) or real(ref))
  loader = ip._LoadSample(srcs, 16, True, "fail", cache_bytes=1 << 30)  # pylint: disable=protected-access
  pairs = [p for s in srcs for p in s.pairs]
  for _ in range(3):
    for pair in pairs:
      loader(pair, np.random.default_rng(0))
  assert sorted(decodes) == sorted(set(p.clean for p in pairs))

  cache = ip.DecodedCache(max_bytes=250)
  loads = []

  def load(n):
    return lambda: loads.append(n) or np.zeros(n, np.uint8)

  a = cache.get("a", load(100))
  with pytest.raises(ValueError, match="read-only"):
    a[0] = 1
  cache.get("b", load(100))
  cache.get("a", load(100))  # hit: "a" becomes the most recent
  cache.get("c", load(100))  # over budget: evicts "b", the least recent
  assert list(cache.items) == ["a", "c"] and cache.bytes == 200
  big = cache.get("big", load(300))  # larger than the budget: returned, never cached
  assert big.flags.writeable and "big" not in cache.items
  cache.get("b", load(100))
  assert loads == [100, 100, 100, 300, 100]


def test_darken_scales_synthetic_clean_crops_but_not_low_light(folders):
  photos = datasets.clean_folder(str(folders / "clean"))
  srcs = ip.synthetic_sources(photos, ["denoise_25", "lowlight"])
  plain = _take(iter(ip.train_dataset(srcs, batch_size=8, patch=32, seed=3)), 4)
  dark = _take(iter(ip.train_dataset(srcs, batch_size=8, patch=32, seed=3, darken=(1.0, 0.3))), 4)
  scales = []
  for a, b in zip(plain, dark):
    np.testing.assert_array_equal(a["task"], b["task"])  # same samples, same crops
    for n in range(8):
      ca, cb = a["clean"][n].astype(np.float64), b["clean"][n].astype(np.float64)
      if a["task"][n] == 1:  # low light: the target exposure is never changed
        np.testing.assert_array_equal(cb, ca)
      else:
        s = cb.sum() / ca.sum()
        np.testing.assert_allclose(cb, s * ca, atol=1e-6)
        scales.append(s)
  assert scales and 0.3 <= min(scales) and max(scales) <= 1.0 and np.ptp(scales) > 0.05
  with pytest.raises(ValueError, match=r"darken=\(probability 2.0, minimum scale 0.5\)"):
    ip.train_dataset(srcs, batch_size=2, patch=32, darken=(2.0, 0.5))
