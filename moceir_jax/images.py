"""Reading and writing user images: any common format in, the same family out.

Every image becomes an RGB float32 array in [0, 1] for the model, together with
an :class:`ImageInfo` that remembers how to write the result back as the input
was: grayscale stays grayscale, alpha is passed through untouched, 16-bit stays
16-bit, JPEG stays JPEG. ``.npy`` arrays are raw float data (HWC or NHWC) and are
neither clipped nor quantised. Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow decodes 16-bit RGB(A) PNGs to 8 bits; pypng keeps all 16.
import png as pypng

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SUPPORTED_EXTENSIONS = IMAGE_EXTENSIONS + (".npy",)
_MAX_PIXELS = 20000 * 20000  # far beyond any photo; guards against decompression bombs
Image.MAX_IMAGE_PIXELS = _MAX_PIXELS


class ImageError(ValueError):
  """An input or output image problem; the message names the file."""


@dataclasses.dataclass
class ImageInfo:
  path: str
  kind: str  # "image" or "npy"
  channels: str = "RGB"  # "L", "LA", "RGB" or "RGBA" as read
  bit_depth: int = 8  # 8 or 16 for images; 32 for npy
  alpha: np.ndarray | None = None  # original alpha, native dtype, passed through
  npy_batched: bool = False  # NHWC rather than HWC

  @property
  def extension(self) -> str:
    return os.path.splitext(self.path)[1].lower()


def _png_bit_depth(path: str) -> int | None:
  with open(path, "rb") as f:
    head = f.read(26)
  if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
    return None
  return head[24]


def _read_png16(path: str):
  width, height, rows, meta = pypng.Reader(filename=path).asDirect()
  planes = meta["planes"]
  arr = np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(height, width, planes)
  channels = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[planes]
  return arr, channels


def read_image(path: str) -> tuple[np.ndarray, ImageInfo]:
  """Returns (array, info). Images: (H, W, 3) float32 in [0, 1]; npy: as stored, float32."""
  ext = os.path.splitext(path)[1].lower()
  if not os.path.isfile(path):
    raise ImageError(f"{path}: no such file")
  if ext == ".npy":
    try:
      arr = np.load(path, allow_pickle=False)
    except Exception as e:
      raise ImageError(f"{path}: not a readable .npy array ({e})") from e
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3 or not np.issubdtype(arr.dtype, np.number):
      raise ImageError(f"{path}: expected a numeric HWC or NHWC array with 3 channels, "
                       f"got {arr.dtype} {arr.shape}")
    return arr.astype(np.float32), ImageInfo(path, "npy", bit_depth=32, npy_batched=arr.ndim == 4)
  if ext not in IMAGE_EXTENSIONS:
    raise ImageError(f"{path}: unsupported file type {ext!r}; expected one of "
                     f"{', '.join(SUPPORTED_EXTENSIONS)}")
  try:
    if ext == ".png" and _png_bit_depth(path) == 16:
      arr, channels = _read_png16(path)
      depth = 16
    else:
      with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        arr, channels, depth = _from_pil(im, path)
  except ImageError:
    raise
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, pypng.Error) as e:
    raise ImageError(f"{path}: cannot decode the image ({e})") from e
  if arr.shape[0] < 1 or arr.shape[1] < 1:
    raise ImageError(f"{path}: empty image {arr.shape}")
  scale = 65535.0 if depth == 16 else 255.0
  x = arr.astype(np.float32) / scale
  alpha = arr[..., -1].copy() if channels in ("LA", "RGBA") else None
  color = x[..., :1] if channels in ("L", "LA") else x[..., :3]
  rgb = np.repeat(color, 3, axis=-1) if color.shape[-1] == 1 else color
  return np.ascontiguousarray(rgb), ImageInfo(path, "image", channels, depth, alpha)


def _from_pil(im: Image.Image, path: str):
  mode = im.mode
  if mode in ("I;16", "I;16B", "I;16L"):
    return np.asarray(im, np.uint16)[..., None], "L", 16
  if mode == "I":  # 32-bit integer grey, e.g. 16-bit TIFFs opened by Pillow
    a = np.asarray(im)
    if a.min() < 0 or a.max() > 65535:
      raise ImageError(f"{path}: 32-bit integer image with values outside 0..65535")
    return a.astype(np.uint16)[..., None], "L", 16
  if mode == "F":
    raise ImageError(f"{path}: floating-point images are not supported; save as .npy")
  if mode == "P":
    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
  elif mode == "PA":
    im = im.convert("RGBA")
  elif mode == "1":
    im = im.convert("L")
  elif mode not in ("L", "LA", "RGB", "RGBA"):
    im = im.convert("RGB")  # CMYK, YCbCr, LAB, ...
  arr = np.asarray(im)
  if arr.ndim == 2:
    arr = arr[..., None]
  return arr, im.mode, 8


def to_output(rgb: np.ndarray, info: ImageInfo) -> np.ndarray:
  """The restored RGB float array in the input's channel layout and bit depth."""
  if info.kind == "npy":
    return rgb.astype(np.float32)
  maxval = 65535 if info.bit_depth == 16 else 255
  dtype = np.uint16 if info.bit_depth == 16 else np.uint8
  x = np.clip(rgb, 0.0, 1.0)
  if info.channels in ("L", "LA"):
    x = (x @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]  # ITU-R 601, as Pillow
  out = np.round(x * maxval).astype(dtype)
  if info.alpha is not None:
    out = np.concatenate([out, info.alpha[..., None].astype(dtype)], axis=-1)
  return out


def write_image(path: str, rgb: np.ndarray, info: ImageInfo) -> None:
  """Writes atomically in the input's format family; the extension of ``path`` decides."""
  data = to_output(rgb, info)
  ext = os.path.splitext(path)[1].lower()
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ext, dir=directory)
  os.close(fd)
  try:
    if info.kind == "npy":
      np.save(tmp, data)
    elif info.bit_depth == 16 and ext == ".png":
      h, w, c = data.shape
      writer = pypng.Writer(w, h, greyscale=c <= 2, alpha=c in (2, 4), bitdepth=16)
      with open(tmp, "wb") as f:
        writer.write(f, data.reshape(h, w * c))
    else:
      img = Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data)
      if info.bit_depth == 16 and data.shape[-1] == 1:
        img = Image.fromarray(data[..., 0], mode="I;16")
      kwargs = {"quality": 95} if ext in (".jpg", ".jpeg", ".webp") else {}
      if ext in (".jpg", ".jpeg") and img.mode in ("RGBA", "LA"):
        img = img.convert(img.mode[:-1])  # JPEG has no alpha
      img.save(tmp, format=Image.registered_extensions()[ext], **kwargs)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
