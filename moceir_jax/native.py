"""Native CPU kernels: compiled on first use, registered as XLA FFI targets.

XLA:CPU runs this model's depthwise convolutions far below memory speed (see
``moceir_jax/native/depthwise.cc`` for why); a few dozen lines of C++ that
vectorise over the contiguous channel axis run them 1.3-4x faster forward and
4-12x faster for the kernel gradient, the largest single cost of a training
step. The source ships with the package and is compiled here, once per machine,
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

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "depthwise.cc")
ENV_SWITCH = "MOCEIR_NATIVE"
_TARGETS = {"moceir_depthwise_forward": "MoceirDepthwiseForward",
            "moceir_depthwise_kernel_grad": "MoceirDepthwiseKernelGrad"}
_lock = threading.Lock()
_state: dict = {}


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _build(cxx: str) -> str:
  """Path of the compiled library, compiling it if the cache has none."""
  with open(SOURCE, "rb") as f:
    source = f.read()
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
    path = os.path.join(folder, f"depthwise-{key}.so")
    if os.path.isfile(path):
      return path
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
      r = subprocess.run([cxx, *flags, SOURCE, "-o", tmp], capture_output=True, text=True,
                         check=False)
      if r.returncode == 0:
        os.replace(tmp, path)  # atomic: a concurrent build of the same key is identical
        return path
      errors.append(f"{' '.join(arch_flags)}: {r.stderr.strip()[-800:]}")
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  raise RuntimeError(f"compiling {SOURCE} with {cxx} failed:\n" + "\n".join(errors))


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
  """custom_partitioning for ``fn(*batched, *replicated)`` whose result is batched."""
  op = custom_partitioning(fn)

  def shardings(mesh, arg_shapes):
    first = arg_shapes[0]
    args = tuple(_batch_sharding(mesh, first.sharding, len(a.shape)) if i < n_batched
                 else NamedSharding(mesh, P()) for i, a in enumerate(arg_shapes))
    return args

  def infer(mesh, arg_shapes, result_shape):
    return _batch_sharding(mesh, arg_shapes[0].sharding, len(result_shape.shape))

  def partition(mesh, arg_shapes, result_shape):
    out = _batch_sharding(mesh, arg_shapes[0].sharding, len(result_shape.shape))
    return mesh, fn, out, shardings(mesh, arg_shapes)

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


__all__ = ["available", "supports", "depthwise_forward", "depthwise_kernel_grad"]
