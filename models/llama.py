"""A decoder-only LM in Flax NNX, Llama / Qwen2 style.

Reads top to bottom: helpers (norm, RoPE, masks), attention, MLP, block,
config, model. Shape suffixes: B batch, T query length, S key length,
D model width, N query heads, K kv heads, G = N // K, H head dim, F mlp width,
V vocab, L layers.

Parameters carry logical axis names in their `axes` metadata ('embed', 'mlp',
'heads', 'kv_heads', 'head_dim', 'vocab', and 'layers' for scanned stacks);
`pipeline/sharding.py` maps them to mesh axes with the config's rules table.
The model never sees a mesh.

With `scan_layers` the L blocks are one Block whose parameters carry a leading
[L] axis, run by `jax.lax.scan`: one block is compiled instead of L (compile
time and program size stop growing with depth). The blocks are initialised
exactly as the unscanned ones and stacked, so the same seed gives the same
weights either way; the two parameter trees differ ('blocks/3/attn/wq_dnh'
vs 'blocks/attn/wq_dnh' [L, ...]), so their checkpoints are not interchangeable.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def _param(rngs: nnx.Rngs, shape, axes, init=nnx.initializers.lecun_normal(), dtype=jnp.float32):
  """A parameter tagged with its logical axis names (one per dimension)."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), shape, dtype), axes=tuple(axes))


class RMSNorm(nnx.Module):
  """Root-mean-square norm; statistics in float32 whatever the compute dtype."""

  def __init__(self, dim: int, eps: float, rngs: nnx.Rngs):
    self.scale = _param(rngs, (dim,), ('norm',), nnx.initializers.ones)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(var + self.eps) * self.scale[...]).astype(x.dtype)


def rope_frequencies(cfg: 'ModelConfig') -> Array:
  """[H/2] RoPE inverse frequencies θ^(-2i/H), rescaled as `cfg.rope_scaling` says
  (the rules of transformers' modeling_rope_utils, for imported checkpoints)."""
  h = cfg.head_dim
  inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
  if cfg.rope_scaling == 'linear':  # position interpolation
    return inv_freq / cfg.rope_factor
  if cfg.rope_scaling == 'llama3':
    # Llama 3.1: wavelengths longer than the original context / low_freq_factor
    # are stretched by the factor, shorter than / high_freq_factor kept, the
    # band between interpolated.
    wavelen = 2 * jnp.pi / inv_freq
    smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
    return jnp.where(wavelen > cfg.rope_original_max_len / cfg.rope_low_freq_factor,
                     inv_freq / cfg.rope_factor,
                     jnp.where(wavelen < cfg.rope_original_max_len / cfg.rope_high_freq_factor,
                               inv_freq, smoothed))
  return inv_freq


def rope(x_btnh: Array, positions_bt: Array, inv_freq: Array) -> Array:
  """Rotary embedding, half-split layout (as in Hugging Face Llama/Qwen)."""
  angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnh.dtype)


def packed_causal_mask(segment_ids_bt: Array) -> Array:
  """[B, 1, T, T] mask: causal, within one document, never onto padding (id 0)."""
  t = segment_ids_bt.shape[1]
  causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
  same_doc = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  real = (segment_ids_bt != 0)[:, None, :]
  return (causal[None] & same_doc & real)[:, None]


class KVCache(NamedTuple):
  """Preallocated keys/values for decoding. Slot s of row b holds the token at
  column s of the (left-padded) sequence; `valid` marks slots holding real
  tokens; `index` is the next slot to write (shared by all rows)."""
  k: Array  # [L, B, S, K, H]
  v: Array  # [L, B, S, K, H]
  valid: Array  # [B, S] bool
  index: Array  # [] int32

  @classmethod
  def init(cls, config: 'ModelConfig', batch: int, max_len: int) -> 'KVCache':
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = config.compute_dtype
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, max_len), jnp.bool_), jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
  """Grouped-query attention (K kv heads shared by G = N // K query heads)."""

  def __init__(self, cfg: 'ModelConfig', rngs: nnx.Rngs):
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg = cfg
    self.wq_dnh = _param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'))
    self.wk_dkh = _param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'))
    self.wv_dkh = _param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'))
    self.wo_nhd = _param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'),
                         nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2))
    if cfg.qkv_bias:
      zeros = nnx.initializers.zeros
      self.bq_nh = _param(rngs, (n, h), ('heads', 'head_dim'), zeros)
      self.bk_kh = _param(rngs, (k, h), ('kv_heads', 'head_dim'), zeros)
      self.bv_kh = _param(rngs, (k, h), ('kv_heads', 'head_dim'), zeros)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg.norm_eps, rngs)
      self.k_norm = RMSNorm(h, cfg.norm_eps, rngs)

  def __call__(self, x_btd, positions_bt, mask_b1ts, kv=None):
    """Returns the attention output and this layer's (k, v) for the cache.

    kv: optional (k_bskh, v_bskh, write_index): cached keys/values of this
      layer; the new keys/values are written at write_index and attention
      runs over the whole cache.
    """
    cfg = self.cfg
    dt = x_btd.dtype
    b, t, d = x_btd.shape
    n, kh, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    # Projections as 2-D matmuls on [B*T, D]: XLA:CPU gives an einsum with
    # two batch-like free dims (b, t) a transposed copy of the activations
    # in the backward pass; the reshapes here are free.
    x_md = x_btd.reshape(b * t, d)  # M = B*T rows
    q = (x_md @ self.wq_dnh[...].reshape(d, n * h).astype(dt)).reshape(b, t, n, h)
    k = (x_md @ self.wk_dkh[...].reshape(d, kh * h).astype(dt)).reshape(b, t, kh, h)
    v = (x_md @ self.wv_dkh[...].reshape(d, kh * h).astype(dt)).reshape(b, t, kh, h)
    if cfg.qkv_bias:
      q = q + self.bq_nh[...].astype(dt)
      k = k + self.bk_kh[...].astype(dt)
      v = v + self.bv_kh[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = rope_frequencies(cfg)
    q = rope(q, positions_bt, inv_freq)
    k = rope(k, positions_bt, inv_freq)
    if kv is not None:
      k_cache, v_cache, index = kv
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
    new_kv = (k, v)
    # Head-major layout, so that both attention einsums are plain batched
    # matmuls over (b, k) with contiguous operands, forward and backward.
    q_bkgth = q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    k_bksh = k.transpose(0, 2, 1, 3)  # [B, K, S, H]
    v_bksh = v.transpose(0, 2, 1, 3)
    # Scores in float32: bf16 logits lose too much precision in the softmax.
    scores_bkgts = jnp.einsum('bkgth,bksh->bkgts', q_bkgth, k_bksh,
                              preferred_element_type=jnp.float32) * (h ** -0.5)
    scores_bkgts = jnp.where(mask_b1ts[:, :, None], scores_bkgts, -1e30)
    probs = jax.nn.softmax(scores_bkgts, axis=-1).astype(dt)
    out_bkgth = jnp.einsum('bkgts,bksh->bkgth', probs, v_bksh)
    out_mnh = out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b * t, n * h)  # [B*T, N*H]
    out_md = out_mnh @ self.wo_nhd[...].reshape(n * h, d).astype(dt)
    return out_md.reshape(b, t, d), new_kv


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: 'ModelConfig', rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.mlp_dim
    self.w_gate_df = _param(rngs, (d, f), ('embed', 'mlp'))
    self.w_up_df = _param(rngs, (d, f), ('embed', 'mlp'))
    self.w_down_fd = _param(rngs, (f, d), ('mlp', 'embed'))

  def __call__(self, x_btd):
    dt = x_btd.dtype
    b, t, d = x_btd.shape
    x_md = x_btd.reshape(b * t, d)  # 2-D matmuls: see Attention.__call__
    gate = x_md @ self.w_gate_df[...].astype(dt)  # [B*T, F]
    up = x_md @ self.w_up_df[...].astype(dt)
    out_md = (jax.nn.silu(gate) * up) @ self.w_down_fd[...].astype(dt)
    return out_md.reshape(b, t, d)


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, cfg: 'ModelConfig', rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_btd, positions_bt, mask_b1ts, kv=None):
    attn_out, new_kv = self.attn(self.attn_norm(x_btd), positions_bt, mask_b1ts, kv)
    x_btd = x_btd + attn_out
    x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
    return x_btd, new_kv


REMAT_POLICIES = {
    'nothing': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the LM. Hashable, so it can be a static jit arg."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  # Long-context RoPE scaling, as in a checkpoint's config.json (models/hf.py):
  # 'none' | 'linear' (every frequency / rope_factor) | 'llama3' (Llama 3.1, with
  # rope_low_freq_factor, rope_high_freq_factor and rope_original_max_len).
  rope_scaling: str = 'none'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-6
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3
  tie_embeddings: bool = True
  dtype: str = 'float32'  # compute dtype; parameters stay float32
  remat: bool = False  # recompute each block's activations in the backward pass
  # What the backward pass keeps of a rematerialised block: 'nothing' (only its
  # input; least memory) | 'dots' (matmul outputs without a batch dim, as in
  # jax.checkpoint_policies.dots_with_no_batch_dims_saveable; less recompute).
  remat_policy: str = 'nothing'
  scan_layers: bool = False  # one scanned Block with [L, ...] params (see module docstring)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} must be a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be even for RoPE')
    if self.dtype not in ('float32', 'bfloat16'):
      raise ValueError(f"dtype={self.dtype!r}: expected 'float32' or 'bfloat16'")
    if self.rope_scaling not in ('none', 'linear', 'llama3'):
      raise ValueError(f"rope_scaling={self.rope_scaling!r}: expected 'none', 'linear' or "
                       "'llama3'")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'remat_policy={self.remat_policy!r}: expected one of '
                       f'{sorted(REMAT_POLICIES)}')

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def num_params(self) -> int:
    d, f, v, h = self.d_model, self.mlp_dim, self.vocab_size, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    if self.qkv_bias:
      per_layer += h * (self.num_heads + 2 * self.num_kv_heads)
    if self.qk_norm:
      per_layer += 2 * h
    embed = v * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + embed + d


class Output(NamedTuple):
  logits: Array  # [B, T, V] float32
  hidden: tuple[Array, ...] | None  # L+1 arrays [B, T, D]: embeddings, then each block's output
  cache: KVCache | None


class Transformer(nnx.Module):
  """The decoder-only LM."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_vd = _param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'),
                           nnx.initializers.normal(stddev=cfg.d_model ** -0.5))
    blocks = [Block(cfg, rngs) for _ in range(cfg.num_layers)]
    self.blocks = stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
    if not cfg.tie_embeddings:
      self.unembed_dv = _param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'))

  def __call__(self, tokens_bt, positions_bt, segment_ids_bt=None, *,
               cache: KVCache | None = None, return_hidden: bool = False) -> Output:
    """Forward pass.

    Args:
      tokens_bt: int32 [B, T] token ids.
      positions_bt: int32 [B, T] position of each token within its document.
      segment_ids_bt: int32 [B, T] document id per token (0 = padding); packed
        documents never attend to each other. None means one document per row.
      cache: decode mode. The T new tokens are written at `cache.index`, marked
        valid where segment_ids_bt != 0, and attend causally to all valid
        cached slots.
      return_hidden: also return the residual stream after the embedding and
        after every block (for hidden-state distillation).
    """
    cfg = self.cfg
    dt = cfg.compute_dtype
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones_like(tokens_bt)
    x = self.embed_vd[...][tokens_bt].astype(dt)  # [B, T, D]
    if cache is None:
      mask = packed_causal_mask(segment_ids_bt)
    else:
      t, s = tokens_bt.shape[1], cache.valid.shape[1]
      valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, segment_ids_bt != 0,
                                                  cache.index, axis=1)  # [B, S]
      query_slot = cache.index + jnp.arange(t)  # [T]
      causal = jnp.arange(s)[None, :] <= query_slot[:, None]  # [T, S]
      mask = (causal[None] & valid[:, None, :])[:, None]  # [B, 1, T, S]
    if cfg.scan_layers:
      x, hidden, new_k, new_v = self._scan_blocks(x, positions_bt, mask, cache, return_hidden)
    else:
      hidden = [x]
      new_k, new_v = [], []
      for i, block in enumerate(self.blocks):
        kv = None if cache is None else (cache.k[i], cache.v[i], cache.index)
        if cfg.remat and cache is None:
          x, layer_kv = nnx.remat(lambda blk, *a: blk(*a),
                                  policy=REMAT_POLICIES[cfg.remat_policy])(
                                      block, x, positions_bt, mask)
        else:
          x, layer_kv = block(x, positions_bt, mask, kv)
        hidden.append(x)
        new_k.append(layer_kv[0])
        new_v.append(layer_kv[1])
    x = self.final_norm(x)
    unembed = self.embed_vd[...].T if cfg.tie_embeddings else self.unembed_dv[...]
    b, t, d = x.shape
    logits = jnp.dot(x.reshape(b * t, d), unembed.astype(dt),
                     preferred_element_type=jnp.float32).reshape(b, t, -1)  # [B, T, V]
    new_cache = None
    if cache is not None:
      new_cache = KVCache(jnp.asarray(new_k), jnp.asarray(new_v), valid, cache.index + t)
    return Output(logits, tuple(hidden) if return_hidden else None, new_cache)

  def _scan_blocks(self, x_btd, positions_bt, mask_b1ts, cache: KVCache | None,
                   return_hidden: bool):
    """The stacked blocks under lax.scan; returns what the unrolled loop does:
    x, the L+1 hidden states (only x_btd unless return_hidden), and each
    layer's keys and values ([L, B, S, K, H])."""
    graphdef, stacked = nnx.split(self.blocks)  # stacked: [L, ...] per parameter

    def body(x, layer):
      params, kv = layer
      x, (k, v) = nnx.merge(graphdef, params)(x, positions_bt, mask_b1ts, kv)
      # The per-layer outputs are kept only when asked for: an [L, B, T, D]
      # stack is as large as all the residuals the backward pass saves.
      return x, (x if return_hidden else None, k, v)

    if self.cfg.remat and cache is None:
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat_policy])
    kv = None if cache is None else (cache.k, cache.v, jnp.broadcast_to(
        cache.index, (self.cfg.num_layers,)))  # [L, B, S, K, H] each, index per layer
    x_out, (hidden_lbtd, k, v) = jax.lax.scan(body, x_btd, (stacked, kv))
    hidden = [x_btd]
    if return_hidden:
      hidden += [hidden_lbtd[i] for i in range(self.cfg.num_layers)]
    return x_out, hidden, k, v


def stack_blocks(blocks: list[Block]) -> Block:
  """One Block whose parameters are the blocks' parameters stacked on a
  leading 'layers' axis ([L, ...]), for `jax.lax.scan`."""
  graphdef = nnx.split(blocks[0])[0]
  states = [nnx.split(b)[1] for b in blocks]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  block = nnx.merge(graphdef, stacked)
  for _, var in nnx.graph.iter_graph(block):
    if isinstance(var, nnx.Variable) and var.has_metadata('axes'):
      var.set_metadata(axes=('layers', *var.get_metadata()['axes']))
  return block
