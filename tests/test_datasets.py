"""Dataset layouts and pairing rules, on folders built here with the real naming rules."""

import os

import pytest

from moceir_jax import datasets


def _touch(root, rel, names):
  folder = os.path.join(root, rel)
  os.makedirs(folder, exist_ok=True)
  for n in names:
    open(os.path.join(folder, n), "wb").close()


@pytest.fixture
def root(tmp_path):
  r = str(tmp_path)
  _touch(r, "denoising/BSD400", ["100075.jpg", "100080.jpg"])
  _touch(r, "denoising/WaterlooED", ["00001.bmp"])
  _touch(r, "deraining/RainTrainL/rainy", ["rain-1.png", "rain-2.png", "rain-10.png"])
  _touch(r, "deraining/RainTrainL/gt", ["norain-1.png", "norain-2.png", "norain-10.png"])
  _touch(r, "dehazing/RESIDE/part1", ["0025_0.8_0.1.jpg", "0025_0.9_0.2.jpg"])
  for p in ("part2", "part3", "part4"):
    _touch(r, f"dehazing/RESIDE/{p}", [f"00{p[-1]}0_1_0.04.jpg"])
  _touch(r, "dehazing/RESIDE/clear", ["0025.jpg", "0020.jpg", "0030.jpg", "0040.jpg"])
  _touch(r, "deblurring/GoPro/crop/train/input_crops", ["a_0.png", "a_1.png"])
  _touch(r, "deblurring/GoPro/crop/train/target_crops", ["a_0.png", "a_1.png"])
  _touch(r, "llie/LOLv1/Train/input", ["2.png", "5.png"])
  _touch(r, "llie/LOLv1/Train/target", ["2.png", "5.png"])
  _touch(r, "dehazing/SOTS/outdoor/hazy", ["0001_0.8_0.2.jpg", "0002_0.8_0.08.jpg"])
  _touch(r, "dehazing/SOTS/outdoor/gt", ["0001.png", "0002.png"])
  _touch(r, "cdd11/train/clear", ["1.png", "2.png"])
  for d in ("low", "haze", "rain", "snow", "low_haze", "haze_rain", "low_haze_rain"):
    _touch(r, f"cdd11/train/{d}", ["1.png", "2.png"])
  return r


def test_denoising_uses_bsd400_and_wed_clean_images(root):
  pairs = datasets.train_pairs(root, "denoise_25")
  assert [os.path.basename(p.clean) for p in pairs] == ["100075.jpg", "100080.jpg", "00001.bmp"]
  assert all(p.degraded is None and p.task == "denoise_25" for p in pairs)


def test_rain_pairs_by_sorted_order_like_the_reference(root):
  pairs = datasets.train_pairs(root, "derain")
  got = [(os.path.basename(p.degraded), os.path.basename(p.clean)) for p in pairs]
  # sorted() order is lexicographic: rain-1, rain-10, rain-2 (as the reference)
  assert got == [("rain-1.png", "norain-1.png"), ("rain-10.png", "norain-10.png"),
                 ("rain-2.png", "norain-2.png")]


def test_reside_hazy_maps_to_clear_by_id(root):
  pairs = datasets.train_pairs(root, "dehaze")
  got = {os.path.basename(p.degraded): os.path.basename(p.clean) for p in pairs}
  assert got["0025_0.8_0.1.jpg"] == "0025.jpg" and got["0025_0.9_0.2.jpg"] == "0025.jpg"
  assert len(pairs) == 5


def test_sots_hazy_maps_to_png_ground_truth(root):
  pairs = datasets.benchmark_pairs(root, "dehaze")
  assert [(os.path.basename(p.degraded), os.path.basename(p.clean)) for p in pairs] == [
      ("0001_0.8_0.2.jpg", "0001.png"), ("0002_0.8_0.08.jpg", "0002.png")]


def test_gopro_and_lol_pair_by_name(root):
  for task in ("deblur", "lowlight"):
    pairs = datasets.train_pairs(root, task)
    assert all(os.path.basename(p.degraded) == os.path.basename(p.clean) for p in pairs)
    assert len(pairs) == 2


@pytest.mark.parametrize("subset, folders", [
    ("single", {"haze", "low", "rain", "snow"}),
    ("double", {"low_haze", "haze_rain"}),
    ("triple", {"low_haze_rain"}),
    ("low_haze", {"low_haze"}),
])
def test_cdd11_subsets(root, subset, folders):
  pairs = datasets.cdd11_pairs(root, "train", subset)
  assert {p.task for p in pairs} == folders
  assert all(os.path.basename(p.clean) == os.path.basename(p.degraded) for p in pairs)
  assert len(datasets.cdd11_pairs(root, "train", "all")) == 14


def test_missing_folder_names_path_and_layout(root):
  with pytest.raises(datasets.LayoutError) as e:
    datasets.benchmark_pairs(root, "derain")
  assert "deraining/Rain100L/rainy" in str(e.value) and "benchmark 'derain'" in str(e.value)


def test_empty_folder_says_so(root):
  _touch(root, "deraining/Rain100L/rainy", [])
  _touch(root, "deraining/Rain100L/gt", [])
  with pytest.raises(datasets.LayoutError, match=r"Rain100L/rainy has no images"):
    datasets.benchmark_pairs(root, "derain")


def test_unpaired_inputs_are_listed(root):
  _touch(root, "deraining/RainTrainL/rainy", ["rain-3.png"])
  with pytest.raises(datasets.LayoutError, match=r"unmatched inputs: \['rain-3.png'\]"):
    datasets.train_pairs(root, "derain")
  os.remove(os.path.join(root, "dehazing/RESIDE/clear/0040.jpg"))
  with pytest.raises(datasets.LayoutError, match=r"0040_1_0.04.jpg -> .*0040.jpg"):
    datasets.train_pairs(root, "dehaze")
  os.remove(os.path.join(root, "cdd11/train/clear/2.png"))
  with pytest.raises(datasets.LayoutError, match=r"low/2.png"):
    datasets.cdd11_pairs(root, "train", "single")
  with pytest.raises(datasets.LayoutError, match=r"no degradation folder 'fog'"):
    datasets.cdd11_pairs(root, "train", "fog")


def test_mini_root_benchmarks_load_with_the_right_counts(mini_root):
  for sigma in (15, 25, 50):
    assert len(datasets.benchmark_pairs(mini_root, f"denoise_{sigma}")) == 68
  rain = datasets.benchmark_pairs(mini_root, "derain")
  haze = datasets.benchmark_pairs(mini_root, "dehaze")
  assert len(rain) == 2 and len(haze) == 2
  assert all(os.path.isfile(p.clean) and os.path.isfile(p.degraded) for p in rain + haze)
