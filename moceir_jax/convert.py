"""Import official MoCE-IR (PyTorch) weights.

``python -m moceir_jax.convert --ckpt PATH --out DIR`` reads an official
Lightning checkpoint (``.ckpt``/``.pth``, keys ``net.<module path>``) or an
``.npz`` state dict, infers the architecture from the tensor shapes, maps every
tensor onto the Flax parameter tree and writes a model checkpoint that
evaluation and restoration load. Every key and shape is checked; problems are
reported together in one error.

torch is needed only to unpickle ``.ckpt`` files (with the safe
``weights_only=True`` loader); ``.npz`` state dicts need nothing extra.
"""

from __future__ import annotations

import math
import os
import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from moceir_jax import checkpoint
from moceir_jax import model as model_lib
from moceir_jax.moce import RANK_TYPES, expert_ranks


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model."""


# ----------------------------------------------------------------------------
# Reading.


def _strip_prefix(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  # Lightning saves the model under its attribute name (`net.`); DataParallel
  # adds `module.`. Strip either when every key carries it.
  out = dict(sd)
  for prefix in ("net.", "module."):
    if out and all(k.startswith(prefix) for k in out):
      out = {k[len(prefix):]: v for k, v in out.items()}
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a reference state dict as float32 NumPy arrays keyed by module path."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as z:
        sd = {k: np.asarray(z[k]) for k in z.files}
    except Exception as e:  # zipfile/pickle/format errors all mean "not an npz"
      raise CheckpointError(f"{path}: not a readable .npz state dict ({e})") from e
  else:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise CheckpointError(
          f"{path}: reading PyTorch checkpoints needs torch (pip install -r "
          "requirements-convert.txt), or pass the state dict as .npz") from e
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
      raise CheckpointError(f"{path}: not a PyTorch checkpoint torch can load safely ({e})") from e
    if isinstance(obj, Mapping) and "state_dict" in obj:
      obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(hasattr(v, "numpy") for v in obj.values()):
      raise CheckpointError(f"{path}: expected a state dict of tensors (or a Lightning "
                            f"checkpoint holding one), found {type(obj).__name__}")
    sd = {k: v.detach().float().numpy() for k, v in obj.items()}
  if not sd:
    raise CheckpointError(f"{path}: the state dict is empty")
  return _strip_prefix(sd)


# ----------------------------------------------------------------------------
# Architecture inference.


def _count(sd, pattern: str) -> int:
  rx = re.compile(pattern)
  return len({m.group(1) for k in sd if (m := rx.match(k))})


def _shape(sd, key):
  if key not in sd:
    raise CheckpointError(f"cannot infer the architecture: key {key!r} is missing")
  return sd[key].shape


def _infer_rank_type(widths, ranks_per_level, num_experts):
  for rank_type in RANK_TYPES:
    first = ranks_per_level[0][0]
    if rank_type == "fact":
      cands = [r for r in range(1, 12) if math.factorial(r) == first]
    else:
      cands = [first]
    for r in cands:
      if all(expert_ranks(w, r, num_experts, rank_type) == rs
             for w, rs in zip(widths, ranks_per_level)):
        return rank_type, r
  raise CheckpointError(f"expert ranks {ranks_per_level} at widths {widths} match no rank_type "
                        f"of {RANK_TYPES}")


def _infer_ffn_factor(sd, dim, levels) -> float:
  # Hidden width is int(width * factor) at every level; the weights give the
  # widths, and the smallest factor reproducing all of them stands for the
  # original (2.66 and 2.65625 build the same network).
  hidden = {}
  for i in range(levels - 1):
    hidden[dim * 2 ** i] = _shape(sd, f"enc.{i}.0.layers.0.ffn.project_in.weight")[0] // 2
  hidden[dim * 2 ** (levels - 1)] = _shape(sd, "latent.layers.0.ffn.project_in.weight")[0] // 2
  factor = max(h / w for w, h in hidden.items())
  for f in (factor, factor + 1e-9):
    if all(int(w * f) == h for w, h in hidden.items()):
      return f
  raise CheckpointError(f"feed-forward widths {hidden} fit no single expansion factor")


def infer_config(sd: Mapping[str, np.ndarray], **overrides) -> model_lib.MoCEIRConfig:
  """Infers a MoCEIRConfig from reference state-dict shapes.

  ``top_k`` and ``with_complexity`` leave no trace in the weights; pass them as
  overrides (defaults: 1 and True, the paper's setting).
  """
  dim, in_ch = _shape(sd, "patch_embed.proj.weight")[:2]
  levels = _count(sd, r"enc\.(\d+)\.") + 1
  num_blocks = [_count(sd, rf"enc\.{i}\.0\.layers\.(\d+)\.") for i in range(levels - 1)]
  num_blocks.append(_count(sd, r"latent\.layers\.(\d+)\."))
  heads = [_shape(sd, f"enc.{i}.0.layers.0.mixer.temperature")[0] for i in range(levels - 1)]
  heads.append(_shape(sd, "latent.layers.0.mixer.temperature")[0])
  dec_counts = [_count(sd, rf"dec\.{i}\.2\.layers\.(\d+)\.") for i in range(levels - 1)]
  num_experts = _count(sd, r"dec\.0\.2\.layers\.0\.adapter\.experts\.(\d+)\.")
  widths = [dim * 2 ** (levels - 2 - i) for i in range(levels - 1)]
  ranks = [[_shape(sd, f"dec.{i}.2.layers.0.adapter.experts.{e}.0.proj.0.weight")[0]
            for e in range(num_experts)] for i in range(levels - 1)]
  rank_type, rank = _infer_rank_type(widths, ranks, num_experts)
  complexity = np.asarray(sd.get("dec.0.2.layers.0.adapter.routing.complexity", [1.0]))
  if np.isclose(complexity.max(), 1.0):
    scale = "max"
  elif np.isclose(complexity.min(), 1.0):
    scale = "min"
  else:
    scale = "none"
  kw = dict(
      dim=int(dim), in_channels=int(in_ch), levels=levels, heads=tuple(heads),
      num_blocks=tuple(num_blocks), num_dec_blocks=tuple(dec_counts[::-1]),
      num_refinement_blocks=_count(sd, r"refinement\.layers\.(\d+)\."),
      ffn_expansion_factor=_infer_ffn_factor(sd, dim, levels),
      layernorm_type="WithBias" if "enc.0.0.layers.0.norms.0.body.bias" in sd else "BiasFree",
      bias="output.bias" in sd, out_channels=int(_shape(sd, "output.weight")[0]),
      num_experts=num_experts, rank=rank if rank_type != "spread" else 2, rank_type=rank_type,
      complexity_scale=scale, top_k=1, with_complexity=True)
  kw.update(overrides)
  try:
    return model_lib.MoCEIRConfig(**kw)
  except ValueError as e:
    raise CheckpointError(f"the inferred architecture is invalid: {e}") from e


# ----------------------------------------------------------------------------
# Key and layout mapping.

_RENAMES = [
    # module level
    (r"^patch_embed\.proj\.", "patch_embed."),
    (r"^enc\.(\d+)\.0\.layers\.(\d+)\.", r"encoder.\1.group.blocks.\2."),
    (r"^enc\.(\d+)\.1\.body\.0\.", r"encoder.\1.down."),
    (r"^latent\.layers\.(\d+)\.", r"latent.blocks.\1."),
    (r"^refinement\.layers\.(\d+)\.", r"refinement.blocks.\1."),
    (r"^freq_embed\.high_conv\.0\.conv\.", "freq_embed.high_pass."),
    (r"^freq_embed\.mlp\.0\.", "freq_embed.fc1."),
    (r"^freq_embed\.mlp\.2\.", "freq_embed.fc2."),
    (r"^dec\.(\d+)\.0\.body\.0\.", r"decoder.\1.up."),
    (r"^dec\.(\d+)\.1\.", r"decoder.\1.fuse."),
    (r"^dec\.(\d+)\.2\.layers\.(\d+)\.", r"decoder.\1.blocks.\2."),
    # inside blocks
    (r"\.norms\.0\.body\.", ".norm1."),
    (r"\.norms\.1\.body\.", ".norm2."),
    (r"\.experts\.(\d+)\.0\.proj\.0\.", r".experts.\1.down."),
    (r"\.experts\.(\d+)\.0\.proj\.1\.", r".experts.\1.gate."),
    (r"\.experts\.(\d+)\.0\.proj\.2\.", r".experts.\1.up."),
    (r"\.experts\.(\d+)\.0\.body\.", r".experts.\1.body."),
    (r"\.body\.norm\.body\.", ".body.norm."),
    (r"(blocks\.\d+)\.proj\.0\.", r"\1.proj_shared."),
    (r"(blocks\.\d+)\.proj\.1\.", r"\1.proj_adapter."),
    (r"\.routing\.gate\.2\.", ".router.gate."),
    (r"\.routing\.", ".router."),
    (r"_dwconv\.", "_dw."),
    (r"\.(mixer|shared)\.project_out\.", r".\1.proj_out."),  # attention output projection
]


def _target_path(key: str) -> str:
  """Our parameter path for a reference state-dict key."""
  path = key
  for rx, repl in _RENAMES:
    path = re.sub(rx, repl, path)
  # The reference calls both attentions `mixer`: self-attention in encoder-style
  # blocks, cross-attention in decoder blocks.
  path = path.replace(".mixer.", ".cross." if path.startswith("decoder.") else ".attn.")
  parent, leaf = path.rsplit(".", 1)
  if leaf == "weight" and not re.search(r"\.norm\d?$", parent):
    path = parent + ".kernel"
  return path


_INVERSE = [
    (r"^patch_embed\.", "patch_embed.proj."),
    (r"^encoder\.(\d+)\.group\.blocks\.(\d+)\.", r"enc.\1.0.layers.\2."),
    (r"^encoder\.(\d+)\.down\.", r"enc.\1.1.body.0."),
    (r"^latent\.blocks\.(\d+)\.", r"latent.layers.\1."),
    (r"^refinement\.blocks\.(\d+)\.", r"refinement.layers.\1."),
    (r"^freq_embed\.high_pass\.", "freq_embed.high_conv.0.conv."),
    (r"^freq_embed\.fc1\.", "freq_embed.mlp.0."),
    (r"^freq_embed\.fc2\.", "freq_embed.mlp.2."),
    (r"^decoder\.(\d+)\.up\.", r"dec.\1.0.body.0."),
    (r"^decoder\.(\d+)\.fuse\.", r"dec.\1.1."),
    (r"^decoder\.(\d+)\.blocks\.(\d+)\.", r"dec.\1.2.layers.\2."),
    (r"\.norm1\.", ".norms.0.body."),
    (r"\.norm2\.", ".norms.1.body."),
    (r"\.(attn|cross)\.proj_out\.", ".mixer.project_out."),
    (r"\.shared\.proj_out\.", ".shared.project_out."),
    (r"\.(attn|cross)\.", ".mixer."),
    (r"\.experts\.(\d+)\.down\.", r".experts.\1.0.proj.0."),
    (r"\.experts\.(\d+)\.gate\.", r".experts.\1.0.proj.1."),
    (r"\.experts\.(\d+)\.up\.", r".experts.\1.0.proj.2."),
    (r"\.experts\.(\d+)\.body\.", r".experts.\1.0.body."),
    (r"\.body\.norm\.", ".body.norm.body."),
    (r"\.proj_shared\.", ".proj.0."),
    (r"\.proj_adapter\.", ".proj.1."),
    (r"\.router\.gate\.", ".routing.gate.2."),
    (r"\.router\.", ".routing."),
    (r"_dw\.", "_dwconv."),
    (r"\.kernel$", ".weight"),
]
_LINEAR = re.compile(r"(router\.(gate|freq_gate)|freq_embed\.fc\d)\.kernel$")


def reference_key(path: str) -> str:
  """The reference state-dict key of one of our parameter paths."""
  for rx, repl in _INVERSE:
    path = re.sub(rx, repl, path)
  return path


def _to_torch_layout(path: str, v: np.ndarray) -> np.ndarray:
  if path.endswith("temperature"):
    return v.reshape(-1, 1, 1)
  if v.ndim == 4:  # HWIO -> OIHW
    return v.transpose(3, 2, 0, 1)
  if v.ndim == 3:  # depthwise (kh, kw, C) -> (C, 1, kh, kw)
    return v.transpose(2, 0, 1)[:, None]
  if v.ndim == 2:
    return v.T if _LINEAR.search(path) else v.T[:, :, None, None]
  return v


def export_state_dict(model: model_lib.MoCEIR) -> dict[str, np.ndarray]:
  """Our parameters as a reference (PyTorch-layout) state dict, keys without ``net.``."""
  out = {}
  for p, var in nnx.to_flat_state(nnx.state(model)):
    path = ".".join(map(str, p))
    out[reference_key(path)] = np.ascontiguousarray(_to_torch_layout(path, np.asarray(var[...])))
  return out


def _to_flax_layout(t: np.ndarray, target_shape) -> np.ndarray:
  if t.ndim == 4:
    if len(target_shape) == 4:  # dense conv OIHW -> HWIO
      return t.transpose(2, 3, 1, 0)
    if len(target_shape) == 3 and t.shape[1] == 1:  # depthwise (C,1,kh,kw) -> (kh,kw,C)
      return t[:, 0].transpose(1, 2, 0)
    if len(target_shape) == 2 and t.shape[2:] == (1, 1):  # 1x1 conv -> (in, out)
      return t[:, :, 0, 0].T
  if t.ndim == 3 and len(target_shape) == 1:  # temperature (heads, 1, 1)
    return t.reshape(-1)
  if t.ndim == 2 and len(target_shape) == 2:  # Linear (out, in) -> (in, out)
    return t.T
  return t


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: model_lib.MoCEIRConfig) -> model_lib.MoCEIR:
  """Builds a MoCEIR with ``cfg`` and fills it from a reference state dict."""
  model = model_lib.create(cfg)
  state = nnx.state(model)
  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
  unknown, bad_shape, seen = [], [], set()
  for key, tensor in sorted(sd.items()):
    path = _target_path(key)
    if path not in flat:
      unknown.append(f"{key} {tuple(tensor.shape)}")
      continue
    var = flat[path]
    value = _to_flax_layout(np.asarray(tensor, np.float32), var.shape)
    if value.shape != tuple(var.shape):
      bad_shape.append(f"{key}: checkpoint {tuple(tensor.shape)} -> {value.shape}, "
                       f"model expects {tuple(var.shape)} (as {path})")
      continue
    if path.endswith("router.complexity") and not np.allclose(value, var[...], rtol=1e-5):
      bad_shape.append(f"{key}: complexity buffer {value.tolist()} differs from the "
                       f"architecture's {np.asarray(var[...]).tolist()}")
      continue
    var.set_value(jnp.asarray(value))
    seen.add(path)
  missing = sorted(p for p in flat if p not in seen)
  problems = []
  if missing:
    problems.append(f"{len(missing)} model parameters missing from the checkpoint: "
                    + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
  if unknown:
    problems.append(f"{len(unknown)} unknown checkpoint keys: "
                    + ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else ""))
  if bad_shape:
    problems.append(f"{len(bad_shape)} tensors of the wrong shape: " + "; ".join(bad_shape[:20]))
  if problems:
    raise CheckpointError("checkpoint does not fit the model:\n  " + "\n  ".join(problems))
  nnx.update(model, state)
  return model


def load_reference(path: str, **overrides) -> model_lib.MoCEIR:
  """Reads an official checkpoint and returns the equivalent Flax model."""
  sd = read_state_dict(path)
  try:
    cfg = infer_config(sd, **overrides)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from e
  try:
    return convert_state_dict(sd, cfg)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from e


# ----------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags; defined only when run as a program, so importing the
  module never claims flag names."""
  flags.DEFINE_string("ckpt", None, "Official checkpoint (.ckpt/.pth) or .npz state dict.")
  flags.DEFINE_string("out", None, "Output directory for the converted model checkpoint.")
  flags.DEFINE_integer("top_k", 1, "Experts per image (not recorded in the weights).")
  flags.DEFINE_bool("with_complexity", True,
                    "Complexity bias in the balance loss (training only; not in the weights).")


def main(argv):
  del argv
  if not FLAGS.ckpt or not FLAGS.out:
    raise app.UsageError("both --ckpt and --out are required")
  try:
    model = load_reference(FLAGS.ckpt, top_k=FLAGS.top_k, with_complexity=FLAGS.with_complexity)
  except CheckpointError as e:
    raise SystemExit(f"error: {e}") from None
  checkpoint.save_model(FLAGS.out, model)
  cfg = model.cfg
  print(f"converted {FLAGS.ckpt} -> {FLAGS.out}: dim={cfg.dim} levels={cfg.levels} "
        f"blocks={list(cfg.num_blocks)} dec={list(cfg.num_dec_blocks)} "
        f"experts={cfg.num_experts} top_k={cfg.top_k}, "
        f"{model_lib.param_count(model):,} parameters")


if __name__ == "__main__":
  define_flags()
  app.run(main)
