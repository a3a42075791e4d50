"""The MoCE-IR network: configuration, the U-Net of transformer blocks, size variants.

The model is a pure function of its parameters and input: it returns the
restored image together with the routing balance loss and the routing
decisions (no hidden mutable state), so training and evaluation code can jit it
as they like. Names of submodules and of the activations it can capture follow
the reference's module paths where that helps to compare the two.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moceir_jax import layers, ops, repeat
from moceir_jax.moce import (COMPLEXITY_SCALES, DISPATCH_MODES, RANK_TYPES, MoCELayer,
                             default_train_dispatch)

ROUTING_NOISE_MODES = ("train", "always", "off")
LAYERNORM_TYPES = ("WithBias", "BiasFree")
# float64 needs jax_enable_x64; it exists to check the float32 path against exact maths.
DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class MoCEIRConfig:
  """Architecture of a MoCE-IR network (the reference's constructor arguments)."""

  dim: int = 32
  levels: int = 4
  heads: tuple[int, ...] = (1, 2, 4, 8)
  num_blocks: tuple[int, ...] = (4, 6, 6, 8)
  # As in the reference, listed shallow to deep: (2, 4, 4) gives the deepest
  # decoder level 4 blocks and the shallowest 2.
  num_dec_blocks: tuple[int, ...] = (2, 4, 4)
  num_refinement_blocks: int = 4
  ffn_expansion_factor: float = 2.0
  layernorm_type: str = "WithBias"
  bias: bool = False
  in_channels: int = 3
  out_channels: int = 3
  num_experts: int = 4
  top_k: int = 1
  rank: int = 2
  rank_type: str = "spread"
  with_complexity: bool = True
  complexity_scale: str = "max"
  # Gaussian noise on the router logits: "train" (default: training only),
  # "always" (the official code, which also adds it at test time), or "off".
  routing_noise: str = "train"
  dtype: str = "float32"
  # Depthwise-conv formulation: None picks by backend (see ops.depthwise_conv).
  depthwise_impl: str | None = None
  # Execution only (same function, same parameters; see moceir_jax/repeat.py).
  # remat recomputes every block in the backward pass: on XLA:CPU it cuts
  # training memory to under half at ~1.6x the step time; off by default
  # (figures: README, "Speed on CPU").
  scan_blocks: bool = False
  remat: bool = False
  # Rematerialise only the blocks of the N highest-resolution levels (0: none;
  # remat=True means all). They hold most of the activations: at 4x128x128
  # the full-resolution level alone holds 57% of MoCE-IR-S's, and N=2 gives
  # nearly remat's saving at a fraction of its recompute.
  remat_levels: int = 0
  # Expert dispatch in training (moceir_jax/moce.py); None picks by backend:
  # sparse on CPU (only the chosen expert runs), dense on accelerators.
  train_dispatch: str | None = None

  def __post_init__(self):
    for name in ("heads", "num_blocks", "num_dec_blocks"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    errors = []
    if self.levels < 2:
      errors.append(f"levels={self.levels} must be >= 2")
    for name, n in (("heads", self.levels), ("num_blocks", self.levels),
                    ("num_dec_blocks", self.levels - 1)):
      if len(getattr(self, name)) != n:
        errors.append(f"{name}={getattr(self, name)} must have {n} entries for levels={self.levels}")
    for w, h in zip([self.dim * 2 ** i for i in range(self.levels)], self.heads):
      if h < 1 or w % h:
        errors.append(f"width {w} is not divisible by its {h} attention heads")
    choices = dict(layernorm_type=LAYERNORM_TYPES, rank_type=RANK_TYPES,
                   complexity_scale=COMPLEXITY_SCALES, routing_noise=ROUTING_NOISE_MODES,
                   dtype=DTYPES)
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        errors.append(f"{name}={getattr(self, name)!r} is not one of {allowed}")
    if self.depthwise_impl not in (None,) + ops.DEPTHWISE_IMPLS:
      errors.append(f"depthwise_impl={self.depthwise_impl!r} is not one of "
                    f"{(None,) + ops.DEPTHWISE_IMPLS}")
    if not 0 <= self.remat_levels <= self.levels:
      errors.append(f"remat_levels={self.remat_levels} must be between 0 and levels={self.levels}")
    if self.train_dispatch not in (None,) + DISPATCH_MODES:
      errors.append(f"train_dispatch={self.train_dispatch!r} is not one of "
                    f"{(None,) + DISPATCH_MODES}")
    if not 1 <= self.top_k <= self.num_experts:
      errors.append(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
    if self.in_channels != self.out_channels:
      errors.append("in_channels must equal out_channels (the output adds the input back)")
    if errors:
      raise ValueError("invalid MoCEIRConfig: " + "; ".join(errors))

  @property
  def size_multiple(self) -> int:
    """H and W must be multiples of this (one 2x downsampling per level)."""
    return 2 ** (self.levels - 1)

  @property
  def freq_dim(self) -> int:
    return self.dim * 2 ** (self.levels - 1)

  @property
  def total_dec_blocks(self) -> int:
    return sum(self.num_dec_blocks)

  def decoder_layout(self) -> list[tuple[int, int, int]]:
    """(width, heads, blocks) per decoder level, deepest first."""
    dims = [self.dim * 2 ** i for i in range(self.levels)][::-1]
    heads = self.heads[::-1]
    blocks = self.num_dec_blocks[::-1]
    return [(dims[i + 1], heads[i + 1], blocks[i]) for i in range(self.levels - 1)]

  def block_names(self) -> list[str]:
    """Reference module path of every decoder block, in execution order."""
    return [f"dec.{i}.2.layers.{j}" for i, (_, _, n) in enumerate(self.decoder_layout())
            for j in range(n)]

  def remat_at(self, level: int) -> bool:
    """Whether the blocks at ``level`` (0: full resolution) are rematerialised."""
    return self.remat or level < self.remat_levels

  def replace(self, **kw) -> "MoCEIRConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MoCEIRConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown MoCEIRConfig keys {unknown}; known keys: {sorted(known)}")
    return cls(**d)

  @classmethod
  def from_reference_kwargs(cls, kw: dict[str, Any], **overrides) -> "MoCEIRConfig":
    """Config from the official ``MoCEIR(**kwargs)`` constructor arguments.

    ``depth_type``/``stage_depth`` are accepted and dropped: in the reference
    they repeat an expert's computation without changing its output.
    """
    rename = dict(inp_channels="in_channels", LayerNorm_type="layernorm_type", topk="top_k")
    ignored = {"depth_type", "stage_depth", "expert_layer"}
    d = {rename.get(k, k): v for k, v in kw.items() if k not in ignored}
    d.update(overrides)
    return cls.from_dict(d)


# ----------------------------------------------------------------------------
# Size variants.


def moceir_s(**kw) -> MoCEIRConfig:
  """MoCE-IR-S of the paper: 11,477,752 parameters."""
  return MoCEIRConfig(dim=32, **kw)


def moceir(**kw) -> MoCEIRConfig:
  """MoCE-IR of the paper: 25,353,796 parameters."""
  return MoCEIRConfig(dim=48, **kw)


def moceir_tiny(**kw) -> MoCEIRConfig:
  """A few-hundred-thousand-parameter model for tests and smoke runs."""
  base = dict(dim=8, num_blocks=(1, 1, 1, 2), num_dec_blocks=(1, 1, 1), num_refinement_blocks=1)
  base.update(kw)
  return MoCEIRConfig(**base)


def moceir_demo(**kw) -> MoCEIRConfig:
  """1.16 M parameters: the small MoCE-IR of the CPU demo and its like-for-like benchmark."""
  base = dict(dim=16, num_blocks=(1, 2, 2, 2), num_dec_blocks=(1, 1, 1), num_refinement_blocks=1)
  base.update(kw)
  return MoCEIRConfig(**base)


def moceir_micro(**kw) -> MoCEIRConfig:
  """Two levels, one block each: compiles in seconds, for tests of training and evaluation."""
  base = dict(dim=8, levels=2, heads=(1, 2), num_blocks=(1, 1), num_dec_blocks=(1,),
              num_refinement_blocks=1)
  base.update(kw)
  return MoCEIRConfig(**base)


VARIANTS = {"s": moceir_s, "base": moceir, "tiny": moceir_tiny, "demo": moceir_demo,
            "micro": moceir_micro}


def variant(name: str, **kw) -> MoCEIRConfig:
  if name not in VARIANTS:
    raise ValueError(f"unknown model variant {name!r}; expected one of {sorted(VARIANTS)}")
  return VARIANTS[name](**kw)


# ----------------------------------------------------------------------------
# Network.


class Output(NamedTuple):
  image: jax.Array  # (B, H, W, C) float32 (float64 for a float64 model)
  aux_loss: jax.Array  # () mean routing balance loss over decoder blocks (0 in eval)
  routing: dict  # block name -> router info (logits, indices, values, gates, aux)
  activations: dict  # reference module path -> activation, when capture=True


class FrequencyEmbedding(nnx.Module):
  """High-pass statistics of the latent that condition every router."""

  def __init__(self, dim: int, *, rngs: layers.Init, impl=None):
    self.high_pass = layers.DepthwiseConv(dim, 3, bias=False, rngs=rngs, impl=impl)
    lap = np.full((3, 3), -1.0, np.float32)
    lap[1, 1] = 8.0
    # Initialised to a Laplacian; the reference's "freeze" does not freeze it,
    # so it is trained (and loaded from checkpoints) like any parameter.
    self.high_pass.kernel.set_value(jnp.asarray(np.repeat(lap[:, :, None], dim, axis=2)))
    self.fc1 = layers.Linear(dim, 2 * dim, bias=True, rngs=rngs)
    self.fc2 = layers.Linear(2 * dim, dim, bias=True, rngs=rngs)

  def __call__(self, x):
    h = jnp.mean(ops.gelu(self.high_pass(x)).astype(ops.acc_dtype(x.dtype)), axis=(1, 2))
    return self.fc2(ops.gelu(self.fc1(h)))


class DecoderBlock(nnx.Module):
  """Shared self-attention and routed expert branches, fused by cross-attention."""

  def __init__(self, dim: int, heads: int, cfg: MoCEIRConfig, *, rngs: layers.Init):
    impl, ln_bias, bias = cfg.depthwise_impl, cfg.layernorm_type == "WithBias", cfg.bias
    self.norm1 = layers.LayerNorm(dim, with_bias=ln_bias)
    self.proj_shared = layers.Pointwise(dim, dim, bias=True, rngs=rngs)
    self.proj_adapter = layers.Pointwise(dim, dim, bias=True, rngs=rngs)
    self.shared = layers.Attention(dim, heads, bias=bias, rngs=rngs, impl=impl)
    self.adapter = MoCELayer(dim, cfg.freq_dim, num_experts=cfg.num_experts, top_k=cfg.top_k,
                             rank=cfg.rank, rank_type=cfg.rank_type,
                             with_complexity=cfg.with_complexity,
                             complexity_scale=cfg.complexity_scale, rngs=rngs, impl=impl)
    self.cross = layers.CrossAttention(dim, heads, bias=bias, rngs=rngs, impl=impl)
    self.norm2 = layers.LayerNorm(dim, with_bias=ln_bias)
    self.ffn = layers.FeedForward(dim, cfg.ffn_expansion_factor, bias=bias, rngs=rngs, impl=impl)

  def __call__(self, x, freq_emb, *, train, noise_key, dispatch, override=None):
    h = self.norm1.operands(x)  # normalised by each 1x1 conv it feeds (ops.NormInput)
    shared = self.shared(self.proj_shared(h))
    adapted, info = self.adapter(self.proj_adapter(h), freq_emb, shared, train=train,
                                 noise_key=noise_key, dispatch=dispatch, override=override)
    x = x + self.cross(adapted, shared)
    x = x + self.ffn(self.norm2.operands(x))
    return x, adapted, info


class Group(nnx.Module):
  """A sequence of transformer blocks at one width."""

  def __init__(self, dim, heads, n, level, cfg: MoCEIRConfig, *, rngs):
    self.blocks = nnx.List([
        layers.TransformerBlock(dim, heads, cfg.ffn_expansion_factor, bias=True,
                                ln_bias=cfg.layernorm_type == "WithBias", rngs=rngs,
                                impl=cfg.depthwise_impl)
        for _ in range(n)
    ])
    self.scan, self.remat = cfg.scan_blocks, cfg.remat_at(level)

  def __call__(self, x):
    return repeat.apply(self.blocks, lambda blk, h, _: (blk(h), None), x,
                        scan=self.scan, remat=self.remat)[0]


class EncoderStage(nnx.Module):

  def __init__(self, dim, heads, n, level, cfg, *, rngs):
    self.group = Group(dim, heads, n, level, cfg, rngs=rngs)
    self.down = layers.Conv(dim, dim // 2, 3, bias=False, rngs=rngs)  # then pixel-unshuffle


class DecoderStage(nnx.Module):

  def __init__(self, dim_in, dim, heads, n, cfg, *, rngs):
    self.up = layers.Conv(dim_in, dim_in * 2, 3, bias=False, rngs=rngs)  # then pixel-shuffle
    self.fuse = layers.Pointwise(2 * dim, dim, bias=cfg.bias, rngs=rngs)
    self.blocks = nnx.List([DecoderBlock(dim, heads, cfg, rngs=rngs) for _ in range(n)])


class MoCEIR(nnx.Module):
  """MoCE-IR: all-in-one image restoration with a mixture of complexity experts."""

  def __init__(self, cfg: MoCEIRConfig, *, rngs: layers.Init):
    self.cfg = cfg
    dims = [cfg.dim * 2 ** i for i in range(cfg.levels)]
    self.patch_embed = layers.Conv(cfg.in_channels, cfg.dim, 3, bias=False, rngs=rngs)
    self.encoder = nnx.List([
        EncoderStage(dims[i], cfg.heads[i], cfg.num_blocks[i], i, cfg, rngs=rngs)
        for i in range(cfg.levels - 1)
    ])
    self.latent = Group(dims[-1], cfg.heads[-1], cfg.num_blocks[-1], cfg.levels - 1, cfg,
                        rngs=rngs)
    self.freq_embed = FrequencyEmbedding(cfg.freq_dim, rngs=rngs, impl=cfg.depthwise_impl)
    self.decoder = nnx.List([
        DecoderStage(2 * w, w, h, n, cfg, rngs=rngs) for (w, h, n) in cfg.decoder_layout()
    ])
    self.refinement = Group(cfg.dim, cfg.heads[0], cfg.num_refinement_blocks, 0, cfg, rngs=rngs)
    self.output = layers.Conv(cfg.dim, cfg.out_channels, 3, bias=cfg.bias, rngs=rngs)

  def __call__(self, x, *, train: bool = False, noise_key=None, dispatch: str | None = None,
               capture: bool = False, routing: dict | None = None) -> Output:
    """Restores ``x`` (B, H, W, C) with H and W multiples of ``cfg.size_multiple``.

    ``noise_key`` drives the routing noise where ``cfg.routing_noise`` asks for
    it; ``dispatch`` defaults to ``cfg.train_dispatch`` in training and to
    sparse otherwise.
    ``capture`` also returns intermediate activations (for parity checks).
    ``routing`` maps decoder block names to ``(indices, values)`` to impose a
    routing decision (broadcast over the batch) instead of the router's own.
    """
    cfg = self.cfg
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"expected input of shape (B, H, W, {cfg.in_channels}), got {x.shape}")
    m = cfg.size_multiple
    if x.shape[1] % m or x.shape[2] % m:
      raise ValueError(
          f"input size {x.shape[1]}x{x.shape[2]} is not a multiple of {m}; "
          "use moceir_jax.inference.restore (pads and crops) for arbitrary sizes")
    if dispatch is None:
      dispatch = (cfg.train_dispatch or default_train_dispatch()) if train else "sparse"
    if dispatch not in DISPATCH_MODES:
      raise ValueError(f"unknown dispatch {dispatch!r}; expected one of {DISPATCH_MODES}")
    noisy = cfg.routing_noise == "always" or (cfg.routing_noise == "train" and train)
    if noisy and noise_key is None:
      raise ValueError(f"routing_noise={cfg.routing_noise!r} needs a noise_key "
                       f"when train={train}")
    names = cfg.block_names()
    keys = jax.random.split(noise_key, len(names)) if noisy else None

    acts, decisions = {}, {}
    acc = ops.acc_dtype(cfg.dtype)
    inp = x.astype(acc)
    feats = self.patch_embed(x.astype(cfg.dtype))
    skips = []
    for i, stage in enumerate(self.encoder):
      feats = stage.group(feats)
      acts[f"enc.{i}.0"] = feats
      skips.append(feats)
      feats = ops.pixel_unshuffle(stage.down(feats))
    feats = self.latent(feats)
    acts["latent"] = feats
    freq = self.freq_embed(feats)
    acts["freq_embed"] = freq
    k = 0
    for i, stage in enumerate(self.decoder):
      feats = ops.pixel_shuffle(stage.up(feats))
      feats = stage.fuse(jnp.concatenate([feats, skips.pop()], axis=-1))
      here = names[k:k + len(stage.blocks)]
      xs = dict(key=None if keys is None else keys[k:k + len(here)],
                override=None if routing is None else jax.tree.map(
                    lambda *a: jnp.stack(a),
                    *[tuple(routing[n]) for n in here]))

      def run(blk, h, x):
        h, adapted, info = blk(h, freq, train=train, noise_key=x["key"], dispatch=dispatch,
                               override=x["override"])
        return h, (info, (adapted, h) if capture else None)

      feats, (infos, captured) = repeat.apply(stage.blocks, run, feats, xs,
                                              scan=cfg.scan_blocks,
                                              remat=cfg.remat_at(cfg.levels - 2 - i))
      for j, name in enumerate(here):
        decisions[name] = jax.tree.map(lambda a, j=j: a[j], infos)
        if capture:
          acts[name + ".adapter"], acts[name] = captured[0][j], captured[1][j]
      k += len(here)
    feats = self.refinement(feats)
    out = self.output(feats).astype(acc) + inp
    aux = sum(r["aux"] for r in decisions.values()) / len(names)
    return Output(out, aux, decisions, acts if capture else {})


# ----------------------------------------------------------------------------
# Construction helpers.


def create(cfg: MoCEIRConfig, seed: int = 0) -> MoCEIR:
  return MoCEIR(cfg, rngs=layers.Init(seed))


def abstract(cfg: MoCEIRConfig) -> MoCEIR:
  """The model with ShapeDtypeStruct leaves: shapes without allocating or computing."""
  return nnx.eval_shape(lambda: MoCEIR(cfg, rngs=layers.Init(0)))


def param_count(model_or_cfg) -> int:
  model = abstract(model_or_cfg) if isinstance(model_or_cfg, MoCEIRConfig) else model_or_cfg
  return ops.num_params(nnx.state(model, nnx.Param))
