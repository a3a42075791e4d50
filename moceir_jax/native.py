"""Native CPU kernels: compiled on first use, registered as XLA FFI targets.

XLA:CPU runs this model's depthwise convolutions far below memory speed (see
``moceir_jax/native/depthwise.cc`` for why); a few dozen lines of C++ that
vectorise over the contiguous channel axis run them 1.3-4x faster forward and
4-12x faster for the kernel gradient, the largest single cost of a training
step; for the attention, the conv writes q, k and v as separate arrays and
takes their gradients (input, kernel and bias in one pass) the same way. The same holds for reductions over the channel axis and chains of
elementwise passes: ``layernorm.cc`` (LayerNorm forward and gradient) and
``gate.cc`` (the feed-forward gate's whole gradient) each read their inputs
once where XLA:CPU made several passes. The sources ship with the package and are compiled here, once per machine,
with the system's C++ compiler against the FFI headers that come with jaxlib;
the library is cached (``$MOCEIR_NATIVE_CACHE``, else ``$XDG_CACHE_HOME`` or
``~/.cache``, under ``moceir_jax/``) under a key of the source, compiler, flags,
jaxlib version and CPU, and written atomically, so concurrent processes and
machines sharing a home directory are safe.

Without a compiler, on another backend, or with ``MOCEIR_NATIVE=0``, callers
fall back to the XLA formulations, which compute the same function (the tests
hold the two equal). Every op here maps one image to one image, or returns a
per-image partial sum, so under a batch-sharded mesh each device runs it on its
own images (``custom_partitioning``), and the per-image partials are added
over the batch by XLA as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from moceir_jax import host

_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
SOURCES = tuple(os.path.join(_FOLDER, name) for name in ("depthwise.cc", "layernorm.cc", "gate.cc"))
HEADERS = (os.path.join(_FOLDER, "common.h"),)
ENV_SWITCH = "MOCEIR_NATIVE"
_TARGETS = {"moceir_depthwise_forward": "MoceirDepthwiseForward",
            "moceir_depthwise_kernel_grad": "MoceirDepthwiseKernelGrad",
            "moceir_depthwise_split_forward": "MoceirDepthwiseSplitForward",
            "moceir_depthwise_split_grad": "MoceirDepthwiseSplitGrad",
            "moceir_layer_norm_forward": "MoceirLayerNormForward",
            "moceir_layer_norm_grad": "MoceirLayerNormGrad",
            "moceir_gate_grad": "MoceirGateGrad"}
_lock = threading.Lock()
_state: dict = {}


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _build(cxx: str) -> str:
  """Path of the compiled library, compiling it if the cache has none."""
  source = b""
  for name in SOURCES + HEADERS:
    with open(name, "rb") as f:
      source += f.read()
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                           check=False).stdout
  include = jax.ffi.include_dir()
  attempts = [["-O3", "-march=native"], ["-O3"]]
  key_base = [source, version.encode(), jax.__version__.encode(), host.cpu_signature().encode(),
              platform.machine().encode()]
  errors = []
  for arch_flags in attempts:
    flags = ["-std=c++17", "-shared", "-fPIC", "-w", *arch_flags, f"-I{include}"]
    key = hashlib.sha256(b"\0".join(key_base + [" ".join(arch_flags).encode()])).hexdigest()[:16]
    folder = host.cache_root(os.environ.get("MOCEIR_NATIVE_CACHE"))
    path = os.path.join(folder, f"kernels-{key}.so")
    if os.path.isfile(path):
      return path
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
      r = subprocess.run([cxx, *flags, *SOURCES, "-o", tmp], capture_output=True, text=True,
                         check=False)
      if r.returncode == 0:
        os.replace(tmp, path)  # atomic: a concurrent build of the same key is identical
        return path
      errors.append(f"{' '.join(arch_flags)}: {r.stderr.strip()[-800:]}")
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  raise RuntimeError(f"compiling {', '.join(SOURCES)} with {cxx} failed:\n" + "\n".join(errors))


def available() -> bool:
  """Whether the native kernels can be used here (CPU backend, compiled and registered)."""
  if os.environ.get(ENV_SWITCH, "1") == "0" or jax.default_backend() != "cpu":
    return False
  with _lock:
    if "ok" not in _state:
      _state["ok"] = False
      cxx = _compiler()
      if cxx is None:
        logging.warning("moceir_jax.native: no C++ compiler found (set CXX); using the slower "
                        "XLA formulation of the depthwise convolutions")
        return False
      try:
        lib = ctypes.cdll.LoadLibrary(_build(cxx))
        for target, symbol in _TARGETS.items():
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                      platform="cpu")
        _state.update(ok=True, lib=lib)
      except (OSError, RuntimeError, AttributeError) as e:
        logging.warning("moceir_jax.native: %s; using the slower XLA formulation", e)
  return _state["ok"]


# ----------------------------------------------------------------------------
# The ops, with their batch-sharding rules.


def _batch_sharding(mesh, sharding, ndim):
  spec = getattr(sharding, "spec", None)
  batch = spec[0] if spec else None
  return NamedSharding(mesh, P(batch, *([None] * (ndim - 1))))


def _per_image_rule(fn, n_batched: int):
  """custom_partitioning for ``fn(*batched, *replicated)`` whose results are all batched."""
  op = custom_partitioning(fn)

  def shardings(mesh, arg_shapes):
    first = arg_shapes[0]
    args = tuple(_batch_sharding(mesh, first.sharding, len(a.shape)) if i < n_batched
                 else NamedSharding(mesh, P()) for i, a in enumerate(arg_shapes))
    return args

  def infer(mesh, arg_shapes, result_shape):
    return jax.tree.map(lambda r: _batch_sharding(mesh, arg_shapes[0].sharding, len(r.shape)),
                        result_shape)

  def partition(mesh, arg_shapes, result_shape):
    return mesh, fn, infer(mesh, arg_shapes, result_shape), shardings(mesh, arg_shapes)

  return op, infer, partition


def _forward_impl(x, kernel):
  return jax.ffi.ffi_call("moceir_depthwise_forward",
                          jax.ShapeDtypeStruct(x.shape, x.dtype))(x, kernel)


def _kernel_grad_impl(x, g, kh, kw):
  out = jax.ShapeDtypeStruct((x.shape[0], kh * kw, x.shape[3]), x.dtype)
  return jax.ffi.ffi_call("moceir_depthwise_kernel_grad", out)(x, g, kh=np.int64(kh),
                                                               kw=np.int64(kw))


_forward_op, _fwd_infer, _fwd_partition = _per_image_rule(_forward_impl, 1)
_forward_op.def_partition(partition=_fwd_partition, infer_sharding_from_operands=_fwd_infer,
                          sharding_rule="b h w c, i j c -> b h w c")


@functools.lru_cache(maxsize=None)
def _kernel_grad_op(kh: int, kw: int):
  op, infer, partition = _per_image_rule(lambda x, g: _kernel_grad_impl(x, g, kh, kw), 2)
  op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                   sharding_rule="b h w c, b h w c -> b t c")
  return op


def depthwise_forward(x, kernel):
  """'same' depthwise cross-correlation of float32 NHWC ``x`` with a (kh, kw, C) kernel."""
  return _forward_op(x, kernel)


def depthwise_kernel_grad(x, g, kh: int, kw: int):
  """Per-image kernel gradient (B, kh*kw, C): sum over pixels of shifted ``x`` times ``g``."""
  return _kernel_grad_op(kh, kw)(x, g)


def supports(x, kernel) -> bool:
  return (x.dtype == jnp.float32 and kernel.dtype == jnp.float32 and x.ndim == 4
          and kernel.shape[0] <= 64 and available())


@functools.lru_cache(maxsize=None)
def _split_ops(n: int, with_bias: bool):
  """(forward, grad) of the depthwise conv whose output is n channel slices."""

  def forward(x, kernel, bias):
    out = jax.ShapeDtypeStruct(x.shape[:3] + (x.shape[3] // n,), x.dtype)
    return tuple(jax.ffi.ffi_call("moceir_depthwise_split_forward", (out,) * n)(
        x, kernel, bias, with_bias=with_bias))

  def grad(x, *rest):  # (x, g_0, ..., g_{n-1}, kernel): the batched operands first
    gs, kernel = rest[:-1], rest[-1]
    b, c, taps = x.shape[0], x.shape[3], kernel.shape[0] * kernel.shape[1]
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, taps, c), x.dtype),
              jax.ShapeDtypeStruct((b, c), x.dtype))
    return jax.ffi.ffi_call("moceir_depthwise_split_grad", shapes)(x, kernel, *gs)

  fwd, infer, partition = _per_image_rule(forward, 1)
  fwd.def_partition(partition=partition, infer_sharding_from_operands=infer,
                    sharding_rule="b h w c, i j c, c -> " + ", ".join(["b h w d"] * n))
  bwd, infer, partition = _per_image_rule(grad, 1 + n)
  bwd.def_partition(partition=partition, infer_sharding_from_operands=infer,
                    sharding_rule=("b h w c, " + "b h w d, " * n
                                   + "i j c -> b h w c, b t c, b c"))
  return fwd, bwd


def depthwise_split_forward(x, kernel, bias, n: int):
  """The n channel slices of depthwise(x, kernel) + bias (``bias`` None: none), as n arrays."""
  with_bias = bias is not None
  if bias is None:
    bias = jnp.zeros(x.shape[-1:], x.dtype)
  return _split_ops(n, with_bias)[0](x, kernel, bias)


def depthwise_split_grad(x, kernel, gs):
  """(dx, per-image kernel gradient (B, kh*kw, C), per-image bias gradient (B, C)) of
  depthwise_split_forward for the slices' gradients ``gs``."""
  return _split_ops(len(gs), False)[1](x, *gs, kernel)


def supports_split(x, kernel, n: int) -> bool:
  return (supports(x, kernel) and x.shape[-1] % n == 0 and (x.shape[-1] // n) % 8 == 0
          and kernel.shape[1] in (3, 7) and kernel.shape[0] % 2 == 1)


@functools.lru_cache(maxsize=None)
def _layer_norm_ops(eps: float, bias_free: bool):
  attrs = dict(eps=np.float32(eps), bias_free=bias_free)

  def forward(x, weight, bias):
    return jax.ffi.ffi_call("moceir_layer_norm_forward",
                            jax.ShapeDtypeStruct(x.shape, x.dtype))(x, weight, bias, **attrs)

  def grad(x, g, weight):
    per_image = jax.ShapeDtypeStruct((x.shape[0], x.shape[-1]), x.dtype)
    return jax.ffi.ffi_call("moceir_layer_norm_grad",
                            (jax.ShapeDtypeStruct(x.shape, x.dtype), per_image, per_image))(
                                x, weight, g, **attrs)

  fwd, infer, partition = _per_image_rule(forward, 1)
  fwd.def_partition(partition=partition, infer_sharding_from_operands=infer,
                    sharding_rule="b h w c, c, c -> b h w c")
  bwd, infer, partition = _per_image_rule(grad, 2)
  bwd.def_partition(partition=partition, infer_sharding_from_operands=infer,
                    sharding_rule="b h w c, b h w c, c -> b h w c, b c, b c")
  return fwd, bwd


def layer_norm_forward(x, weight, bias, eps: float, bias_free: bool):
  """Channel LayerNorm of float32 NHWC ``x`` (``bias`` is ignored when ``bias_free``)."""
  return _layer_norm_ops(float(eps), bool(bias_free))[0](x, weight, bias)


def layer_norm_grad(x, g, weight, eps: float, bias_free: bool):
  """(dx, per-image weight gradient (B, C), per-image bias gradient (B, C))."""
  return _layer_norm_ops(float(eps), bool(bias_free))[1](x, g, weight)


def supports_layer_norm(x) -> bool:
  return x.dtype == jnp.float32 and x.ndim == 4 and available()


def _gate_grad_impl(x, g, kernel, bias):
  b, c = x.shape[0], x.shape[3]
  shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, 9, c), x.dtype),
            jax.ShapeDtypeStruct((b, c), x.dtype), jax.ShapeDtypeStruct(g.shape, x.dtype))
  return jax.ffi.ffi_call("moceir_gate_grad", shapes)(x, kernel, bias, g)


_gate_grad_op, _infer, _partition = _per_image_rule(_gate_grad_impl, 2)
_gate_grad_op.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                            sharding_rule="b h w c, b h w d, i j c, c -> b h w c, b t c, b c, b h w d")


def gate_grad(x, g, kernel, bias):
  """(dx, per-image kernel gradient (B, 9, C), per-image bias gradient (B, C), the
  output) of GELU(y1) * y2, y = depthwise3x3(x, kernel) + bias split in channel
  halves, for the output gradient ``g``. The output is computed again on the way
  (within float32 rounding of the forward pass's) for the 1x1 conv after the gate."""
  return _gate_grad_op(x, g, kernel, bias)


def supports_gate(x, kernel) -> bool:
  return (x.dtype == jnp.float32 and kernel.dtype == jnp.float32 and x.ndim == 4
          and kernel.shape[:2] == (3, 3) and x.shape[-1] % 16 == 0 and available())


__all__ = ["available", "supports", "depthwise_forward", "depthwise_kernel_grad",
           "depthwise_split_forward", "depthwise_split_grad", "supports_split",
           "layer_norm_forward", "layer_norm_grad", "supports_layer_norm",
           "gate_grad", "supports_gate"]
