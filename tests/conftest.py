"""Shared test helpers: the reference parity fixtures and the real-data folder."""

import json
import os

# Tests compile many small models; XLA's backend optimisations roughly double
# compile time and buy nothing at these sizes (numerics are unaffected at the
# tolerances tested). Must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # pylint: disable=wrong-import-position
import numpy as np
import pytest

# Parity is judged in float32 at full matmul precision, whatever the backend.
jax.config.update("jax_default_matmul_precision", "highest")

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
REFERENCE = os.path.join(HERE, "data", "reference")
SHARED_DATA = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))
FIXTURES = ("tinyA", "tinyB", "tinyC")


def reference_file(name: str) -> str:
  return os.path.join(REFERENCE, name)


def reference_config(name: str) -> dict:
  with open(reference_file(f"{name}_config.json")) as f:
    return json.load(f)


def reference_io(name: str):
  return np.load(reference_file(f"{name}_io.npz"))


def nhwc(a):
  return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def nchw(a):
  return np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))


@pytest.fixture(scope="session")
def mini_root():
  path = os.path.join(SHARED_DATA, "mini_root")
  if not os.path.isdir(path):
    pytest.skip(f"real test data not found at {path} (it sits beside the project in CI)")
  return path


def jit_forward(model, **kwargs):
  """``model(x, **kwargs)`` compiled once; eager NNX runs op by op and is far slower."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x, key: nnx.merge(graphdef, s)(x, noise_key=key, **kwargs))
  return lambda x, key=None: fn(state, x, key)
