"""The restore command: folders of mixed images, tiling, errors, inputs never touched."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import PROJECT
from moceir_jax import checkpoint, images, inference, restore
from moceir_jax import model as model_lib

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def tiny():
  return model_lib.create(model_lib.moceir_tiny(), seed=0)


@pytest.fixture(scope="module")
def restorer(tiny):
  # one tile geometry for the whole module: each new shape is a new compilation
  return inference.Restorer(tiny, tile=64, overlap=16, tile_batch=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny):
  path = str(tmp_path_factory.mktemp("m") / "model")
  checkpoint.save_model(path, tiny)
  return path


def _smooth(h, w):
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  img = np.stack([np.sin(3 * xx + 1), np.cos(4 * yy), np.sin(2 * (xx + yy))], -1) * 0.4 + 0.5
  return (img + 0.03 * RNG.normal(size=img.shape)).astype(np.float32)


def test_tiles_cover_and_blend():
  assert inference.tile_starts(100, 48, 16) == [0, 32, 52]
  assert inference.tile_starts(40, 48, 16) == [0]
  w = inference.blend_window(48, 16)
  assert w.shape == (48, 48) and w.min() > 0 and w[16:32, 16:32].min() == 1.0
  with pytest.raises(ValueError, match="tile=50 must be a multiple of 8"):
    inference.Restorer(model_lib.create(model_lib.moceir_tiny()), tile=50)


def test_tiling_matches_whole_image_away_from_seams(tiny, restorer):
  # MoCE-IR's channel attention pools over the whole input, so a tile is not
  # exactly a crop of the whole-image result; the blend must keep the two
  # close. Routing is shared (decided on the whole view), so they differ only
  # through those image statistics.
  x = _smooth(96, 160)
  whole_r = inference.Restorer(tiny, tile=256)
  whole = np.asarray(whole_r(x).image)
  tiled = np.asarray(restorer(x).image)
  assert tiled.shape == whole.shape == x.shape
  change = np.mean(np.abs(whole - x))
  err = np.abs(tiled - whole)[8:-8, 8:-8]
  assert np.mean(err) < 0.1 * change, (np.mean(err), change)
  whole_routes = whole_r(x).indices
  for name, idx in restorer(x).indices.items():
    np.testing.assert_array_equal(idx, whole_routes[name])


def test_any_size_and_one_pixel(restorer):
  for shape in [(37, 91, 3), (1, 1, 3), (130, 9, 3)]:
    out = restorer(np.full(shape, 0.5, np.float32))
    assert out.image.shape == shape and np.isfinite(np.asarray(out.image)).all()


def _digest(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def test_folder_of_mixed_images(tmp_path, restorer):
  src = tmp_path / "in"
  src.mkdir()
  Image.fromarray((_smooth(30, 41) * 255).astype(np.uint8)).save(src / "rgb.jpg")
  Image.fromarray((_smooth(20, 20)[..., 0] * 255).astype(np.uint8)).save(src / "gray.png")
  rgba = np.concatenate([(_smooth(16, 24) * 255).astype(np.uint8),
                         RNG.integers(0, 256, (16, 24, 1), dtype=np.uint8)], -1)
  Image.fromarray(rgba).save(src / "alpha.png")
  np.save(src / "raw.npy", _smooth(16, 16) * 3 - 1)
  (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  (src / "notes.txt").write_text("not an image")
  before = {p: _digest(src / p) for p in os.listdir(src)}

  files = restore.list_inputs(str(src))
  assert [os.path.basename(f) for f in files] == ["alpha.png", "broken.png", "gray.png",
                                                  "raw.npy", "rgb.jpg"]
  lines = []
  summary = restore.restore_files(restorer, files, str(tmp_path / "out"), log=lines.append)
  assert list(summary["failures"]) == [str(src / "broken.png")]
  assert "broken.png" in summary["failures"][str(src / "broken.png")]
  assert sorted(os.listdir(tmp_path / "out")) == ["alpha.png", "gray.png", "raw.npy", "rgb.jpg"]
  assert Image.open(tmp_path / "out" / "gray.png").mode == "L"
  out_alpha = np.asarray(Image.open(tmp_path / "out" / "alpha.png"))
  np.testing.assert_array_equal(out_alpha[..., 3], rgba[..., 3])
  raw = np.load(tmp_path / "out" / "raw.npy")
  assert raw.shape == (16, 16, 3) and raw.dtype == np.float32
  assert any("img/s" in line and "experts dec.0:" in line for line in lines)
  assert {p: _digest(src / p) for p in os.listdir(src)} == before  # inputs untouched


def test_never_overwrites_inputs(tmp_path, restorer):
  path = tmp_path / "a.png"
  Image.fromarray((_smooth(16, 16) * 255).astype(np.uint8)).save(path)
  before = _digest(path)
  summary = restore.restore_files(restorer, [str(path)], str(tmp_path), log=lambda _: None)
  assert "refusing to overwrite an input" in summary["failures"][str(path)]
  assert _digest(path) == before


def test_input_errors(tmp_path):
  with pytest.raises(restore.InputError, match="folder has no images"):
    (tmp_path / "empty").mkdir()
    restore.list_inputs(str(tmp_path / "empty"))
  with pytest.raises(restore.InputError, match="pattern matches no files"):
    restore.list_inputs(str(tmp_path / "*.png"))
  with pytest.raises(restore.InputError, match="no such file or folder"):
    restore.list_inputs(str(tmp_path / "missing.png"))


def test_command_line(tmp_path, model_dir):
  src = tmp_path / "photo.png"
  Image.fromarray((_smooth(24, 40) * 255).astype(np.uint8)).save(src)
  run = lambda *args: subprocess.run([sys.executable, "-m", "moceir_jax.restore", *args],
                                     capture_output=True, text=True, cwd=PROJECT, check=False)
  # a training work directory holds its exported model in WORKDIR/model
  workdir = os.path.dirname(model_dir)
  assert os.path.basename(model_dir) == "model"
  proc = run(f"--workdir={workdir}", f"--input={src}", f"--output={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr
  assert "restored 1 of 1 file(s)" in proc.stdout
  out, info = images.read_image(str(tmp_path / "out" / "photo.png"))
  assert out.shape == (24, 40, 3) and info.channels == "RGB"
  proc = run(f"--checkpoint={model_dir}", f"--input={tmp_path / 'nothing'}",
             f"--output={tmp_path / 'o2'}")
  assert proc.returncode != 0 and "nothing: no such file or folder" in proc.stderr
