"""Reading and writing user images in every supported form."""

import os

import numpy as np
import pytest
from PIL import Image

from moceir_jax import images

RNG = np.random.default_rng(0)


def _save(path, arr, mode=None, **kw):
  Image.fromarray(arr, mode=mode).save(path, **kw)
  return str(path)


def test_rgb_png_round_trip(tmp_path):
  arr = RNG.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
  x, info = images.read_image(_save(tmp_path / "a.png", arr))
  assert x.shape == (7, 9, 3) and x.dtype == np.float32 and info.channels == "RGB"
  np.testing.assert_allclose(x * 255, arr, atol=1e-4)
  images.write_image(str(tmp_path / "b.png"), x, info)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")), arr)


def test_grayscale_is_replicated_and_written_back_gray(tmp_path):
  arr = RNG.integers(0, 256, size=(5, 6), dtype=np.uint8)
  x, info = images.read_image(_save(tmp_path / "g.png", arr))
  assert x.shape == (5, 6, 3) and info.channels == "L"
  np.testing.assert_allclose(x[..., 1] * 255, arr, atol=1e-4)
  images.write_image(str(tmp_path / "o.png"), x, info)
  back = Image.open(tmp_path / "o.png")
  assert back.mode == "L"
  np.testing.assert_array_equal(np.asarray(back), arr)


def test_rgba_alpha_passes_through(tmp_path):
  arr = RNG.integers(0, 256, size=(4, 5, 4), dtype=np.uint8)
  x, info = images.read_image(_save(tmp_path / "a.png", arr))
  assert x.shape == (4, 5, 3) and info.channels == "RGBA"
  images.write_image(str(tmp_path / "o.png"), 1.0 - x, info)  # "restore" = invert colours
  back = np.asarray(Image.open(tmp_path / "o.png"))
  assert back.shape == (4, 5, 4)
  np.testing.assert_array_equal(back[..., 3], arr[..., 3])
  np.testing.assert_array_equal(back[..., :3], 255 - arr[..., :3])


def test_palette_image_reads_as_rgb(tmp_path):
  rgb = RNG.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
  pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
  pal.save(tmp_path / "p.png")
  x, info = images.read_image(str(tmp_path / "p.png"))
  assert x.shape == (6, 6, 3) and info.channels == "RGB"
  np.testing.assert_allclose(x * 255, np.asarray(pal.convert("RGB")), atol=1e-4)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16bit_png_round_trip(tmp_path, channels):
  import png  # pylint: disable=import-outside-toplevel
  arr = RNG.integers(0, 65536, size=(5, 7, channels), dtype=np.uint16)
  path = str(tmp_path / "d.png")
  with open(path, "wb") as f:
    png.Writer(7, 5, greyscale=channels == 1, alpha=channels == 4, bitdepth=16).write(
        f, arr.reshape(5, 7 * channels))
  x, info = images.read_image(path)
  assert info.bit_depth == 16 and x.shape == (5, 7, 3)
  np.testing.assert_allclose(x[..., 0] * 65535, arr[..., 0], atol=1e-2)  # not cut to 8 bits
  out = str(tmp_path / "o.png")
  images.write_image(out, x, info)
  _, _, rows, meta = png.Reader(filename=out).asDirect()
  back = np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(5, 7, meta["planes"])
  assert meta["bitdepth"] == 16 and meta["planes"] == channels
  np.testing.assert_array_equal(back, arr)


def test_exif_orientation_is_applied(tmp_path):
  arr = np.zeros((4, 8, 3), np.uint8)
  arr[0, 0] = 255  # a marked corner
  img = Image.fromarray(arr)
  exif = img.getexif()
  exif[0x0112] = 6  # rotate 90 CW to display
  img.save(tmp_path / "r.jpg", exif=exif, quality=100)
  x, _ = images.read_image(str(tmp_path / "r.jpg"))
  assert x.shape == (8, 4, 3)  # displayed upright: portrait
  assert x[0, -1].mean() > 0.5  # the marked corner moved to the top right


def test_npy_round_trip_is_not_clipped(tmp_path):
  arr = RNG.normal(size=(2, 6, 5, 3)).astype(np.float32) * 3  # NHWC, outside [0, 1]
  path = str(tmp_path / "x.npy")
  np.save(path, arr)
  x, info = images.read_image(path)
  assert info.kind == "npy" and info.npy_batched
  images.write_image(str(tmp_path / "y.npy"), x * 2, info)
  np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), arr * 2)


@pytest.mark.parametrize("content, name, message", [
    (b"not an image at all", "bad.png", "cannot decode"),
    (b"", "empty.jpg", "cannot decode"),
    (b"x", "notes.txt", "unsupported file type '.txt'"),
])
def test_bad_files_are_named(tmp_path, content, name, message):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(images.ImageError, match=message) as e:
    images.read_image(str(path))
  assert name in str(e.value)


def test_bad_npy_is_named(tmp_path):
  np.save(tmp_path / "m.npy", np.zeros((4, 4), np.float32))
  with pytest.raises(images.ImageError, match=r"m.npy: expected a numeric HWC or NHWC"):
    images.read_image(str(tmp_path / "m.npy"))


def test_write_is_atomic(tmp_path, monkeypatch):
  arr = RNG.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
  x, info = images.read_image(_save(tmp_path / "a.png", arr))
  out = tmp_path / "out"

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(Image.Image, "save", boom)
  with pytest.raises(OSError, match="disk full"):
    images.write_image(str(out / "a.png"), x, info)
  assert os.listdir(out) == []  # no partial file, no temporary left behind
