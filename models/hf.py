"""Hugging Face checkpoints (Llama, Qwen2, Qwen3) in and out of `models/llama.py`.

Import reads a local folder (`config.json`, `model.safetensors` or shards with
`model.safetensors.index.json`) tensor by tensor: every parameter is built with
`jax.make_array_from_callback` on its target sharding, and each device's
callback reads only its own slice of the tensor through safetensors' lazy
`get_slice`. The whole model never exists on one host.

Layouts. Hugging Face stores a Linear weight as [out, in]; our matmul weights
are [in, out...] with heads split out (`wq_dnh` [D, N, H] is q_proj [N*H, D]
transposed and reshaped; `wo_nhd` [N, H, D] is o_proj [D, N*H] transposed).
Both use the half-split (rotate_half) RoPE convention, so q/k need no
permutation. Every mapping below is a `Layout`: the Hugging Face tensor,
reshaped to `groups` (one tuple of our dims per HF axis) and transposed by
`perm`, is our parameter.

No torch or transformers here: the tests compare against them, the code
does not need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import Any, Iterator

import jax
import numpy as np
from safetensors import safe_open

from models.llama import ModelConfig

CONFIG_FILE = 'config.json'
INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'

# architecture -> model_type; our model covers exactly these three.
ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'Qwen2ForCausalLM': 'qwen2',
                 'Qwen3ForCausalLM': 'qwen3'}


# ----------------------------------------------------------------------------
# config.json <-> ModelConfig


def read_config(path: str) -> dict:
  """The checkpoint's config.json as a dict (path: the checkpoint folder)."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(f'{path} is not a Hugging Face checkpoint: no {CONFIG_FILE}')
  with open(file) as f:
    return json.load(f)


def _rope(hf: dict, file: str) -> dict:
  """ModelConfig's rope fields: θ and the scaling ('linear', 'llama3').

  transformers >= 5 writes `rope_parameters: {rope_type, rope_theta, ...}`;
  older checkpoints write `rope_theta` and `rope_scaling: {type|rope_type, ...}`.
  """
  params = hf.get('rope_parameters') or {}
  key, scaling = 'rope_parameters', params
  if params.get('rope_type', 'default') == 'default':
    key, scaling = 'rope_scaling', hf.get('rope_scaling') or {}
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  out = dict(rope_theta=float(params.get('rope_theta', hf.get('rope_theta', 10_000.0))))
  if hf.get('partial_rotary_factor', params.get('partial_rotary_factor', 1.0)) != 1.0:
    raise ValueError(f'{file}: partial_rotary_factor is not supported (RoPE on every dim)')
  try:
    if kind == 'default':
      return out
    if kind == 'linear':
      return dict(out, rope_scaling='linear', rope_factor=float(scaling['factor']))
    if kind == 'llama3':
      return dict(out, rope_scaling='llama3', rope_factor=float(scaling['factor']),
                  rope_low_freq_factor=float(scaling['low_freq_factor']),
                  rope_high_freq_factor=float(scaling['high_freq_factor']),
                  rope_original_max_len=int(scaling['original_max_position_embeddings']))
  except KeyError as e:
    raise ValueError(f'{file}: {key} of type {kind!r} has no {e.args[0]!r}') from None
  raise ValueError(
      f'{file}: {key}.rope_type={kind!r} is not supported: models/llama.py implements '
      "plain RoPE and the 'linear' and 'llama3' scalings (not dynamic, yarn or longrope). "
      'Removing the scaling from config.json is only safe for contexts within the '
      'original pretraining length.')


def _rope_parameters(cfg: ModelConfig) -> dict:
  """The inverse of `_rope`, as transformers >= 5 writes it."""
  out = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  if cfg.rope_scaling == 'linear':
    out.update(rope_type='linear', factor=cfg.rope_factor)
  elif cfg.rope_scaling == 'llama3':
    out.update(rope_type='llama3', factor=cfg.rope_factor,
               low_freq_factor=cfg.rope_low_freq_factor,
               high_freq_factor=cfg.rope_high_freq_factor,
               original_max_position_embeddings=cfg.rope_original_max_len)
  return out


def model_config(path: str, **overrides) -> ModelConfig:
  """Our ModelConfig for the checkpoint at `path`.

  Args:
    path: the checkpoint folder.
    **overrides: ModelConfig fields that do not change the weights' shapes
      (`dtype`, `remat`, ...). A shape field that disagrees with config.json
      is an error naming it.

  Raises:
    ValueError naming the architecture or option we cannot represent.
  """
  hf = read_config(path)
  file = os.path.join(path, CONFIG_FILE)
  archs = hf.get('architectures') or []
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(f'{file}: architectures={archs} is not supported; supported: '
                     f'{sorted(ARCHITECTURES)}')
  arch = archs[0]
  family = ARCHITECTURES[arch]
  if hf.get('model_type', family) != family:
    raise ValueError(f'{file}: model_type={hf.get("model_type")!r} does not match '
                     f'architectures=[{arch!r}] (expected {family!r})')
  unsupported = {
      'hidden_act': (hf.get('hidden_act', 'silu') != 'silu', 'only silu (SwiGLU) is implemented'),
      'mlp_bias': (bool(hf.get('mlp_bias', False)), 'the MLP has no biases'),
      'attention_bias': (family in ('llama', 'qwen3') and bool(hf.get('attention_bias', False)),
                         'it adds an o_proj bias, which our attention does not have'),
      'use_sliding_window': (bool(hf.get('use_sliding_window', False)),
                             'sliding-window attention is not implemented'),
  }
  for key, (bad, why) in unsupported.items():
    if bad:
      raise ValueError(f'{file}: {key}={hf[key]!r} ({arch}) is not supported: {why}')
  try:
    d, heads = hf['hidden_size'], hf['num_attention_heads']
    fields = dict(
        vocab_size=hf['vocab_size'], d_model=d, num_layers=hf['num_hidden_layers'],
        num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
        head_dim=hf.get('head_dim') or d // heads, mlp_dim=hf['intermediate_size'],
        **_rope(hf, file), norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
        qkv_bias=family == 'qwen2', qk_norm=family == 'qwen3',
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)))
  except KeyError as e:
    raise ValueError(f'{file}: missing key {e.args[0]!r}') from None
  for key, value in overrides.items():
    if key in fields and value != fields[key]:
      raise ValueError(f'{key}={value!r} disagrees with {file} ({fields[key]!r}); only '
                       'fields that do not change the weights can be overridden')
  return ModelConfig(**{**fields, **overrides})


def hf_config(cfg: ModelConfig, *, base: dict | None = None) -> dict:
  """config.json for our model: Qwen3 with q/k norm, Qwen2 with QKV bias, else Llama.

  base: a source checkpoint's config.json whose non-shape entries (token ids,
    max_position_embeddings, ...) are kept.
  """
  if cfg.qk_norm and cfg.qkv_bias:
    raise ValueError('no supported Hugging Face architecture has both q/k norm and QKV '
                     'bias without an o_proj bias (Qwen3 attention_bias adds one)')
  family = 'qwen3' if cfg.qk_norm else 'qwen2' if cfg.qkv_bias else 'llama'
  arch = {v: k for k, v in ARCHITECTURES.items()}[family]
  out = {k: v for k, v in (base or {}).items()
         if k in ('bos_token_id', 'eos_token_id', 'pad_token_id', 'max_position_embeddings')}
  out.setdefault('max_position_embeddings', 32768 if family != 'llama' else 8192)
  out.update(
      architectures=[arch], model_type=family, vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act='silu',
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      # Both spellings: transformers >= 5 reads rope_parameters, 4.x rope_theta
      # and rope_scaling.
      rope_theta=cfg.rope_theta, rope_parameters=_rope_parameters(cfg),
      rope_scaling=({k: v for k, v in _rope_parameters(cfg).items() if k != 'rope_theta'}
                    if cfg.rope_scaling != 'none' else None),
      dtype='float32', torch_dtype='float32')
  if family == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False, sliding_window=None,
               max_window_layers=cfg.num_layers)
    if family == 'qwen3':
      out.update(attention_bias=False)
  return out


# ----------------------------------------------------------------------------
# Parameter layouts


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one of our parameters sits in a Hugging Face tensor.

  hf_name: the tensor's name in the checkpoint.
  groups: per HF axis, the tuple of our dims it flattens (row-major).
  perm: our array = hf.reshape(all group dims).transpose(perm).
  """
  hf_name: str
  groups: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(g) for g in self.groups)

  @property
  def split_shape(self) -> tuple[int, ...]:
    return tuple(d for g in self.groups for d in g)


def _layout(path: tuple, cfg: ModelConfig) -> Layout:
  """The Layout of our parameter at `path` (keys of the params pure dict)."""
  d, f, v = cfg.d_model, cfg.mlp_dim, cfg.vocab_size
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  same = lambda name, *dims: Layout(name, tuple((x,) for x in dims), tuple(range(len(dims))))
  if path == ('embed_vd',):
    return same('model.embed_tokens.weight', v, d)
  if path == ('final_norm', 'scale'):
    return same('model.norm.weight', d)
  if path == ('unembed_dv',):
    return Layout('lm_head.weight', ((v,), (d,)), (1, 0))  # [V, D] -> [D, V]
  if len(path) >= 3 and path[0] == 'blocks' and isinstance(path[1], int):
    pre = f'model.layers.{path[1]}.'
    rest = path[2:]
    table = {
        ('attn_norm', 'scale'): same(pre + 'input_layernorm.weight', d),
        ('mlp_norm', 'scale'): same(pre + 'post_attention_layernorm.weight', d),
        # [N*H, D] -> [N, H, D] -> [D, N, H]
        ('attn', 'wq_dnh'): Layout(pre + 'self_attn.q_proj.weight', ((n, h), (d,)), (2, 0, 1)),
        ('attn', 'wk_dkh'): Layout(pre + 'self_attn.k_proj.weight', ((k, h), (d,)), (2, 0, 1)),
        ('attn', 'wv_dkh'): Layout(pre + 'self_attn.v_proj.weight', ((k, h), (d,)), (2, 0, 1)),
        # [D, N*H] -> [D, N, H] -> [N, H, D]
        ('attn', 'wo_nhd'): Layout(pre + 'self_attn.o_proj.weight', ((d,), (n, h)), (1, 2, 0)),
        ('attn', 'bq_nh'): Layout(pre + 'self_attn.q_proj.bias', ((n, h),), (0, 1)),
        ('attn', 'bk_kh'): Layout(pre + 'self_attn.k_proj.bias', ((k, h),), (0, 1)),
        ('attn', 'bv_kh'): Layout(pre + 'self_attn.v_proj.bias', ((k, h),), (0, 1)),
        ('attn', 'q_norm', 'scale'): same(pre + 'self_attn.q_norm.weight', h),
        ('attn', 'k_norm', 'scale'): same(pre + 'self_attn.k_norm.weight', h),
        # [F, D] -> [D, F]; down [D, F] -> [F, D]
        ('mlp', 'w_gate_df'): Layout(pre + 'mlp.gate_proj.weight', ((f,), (d,)), (1, 0)),
        ('mlp', 'w_up_df'): Layout(pre + 'mlp.up_proj.weight', ((f,), (d,)), (1, 0)),
        ('mlp', 'w_down_fd'): Layout(pre + 'mlp.down_proj.weight', ((d,), (f,)), (1, 0)),
    }
    if rest in table:
      return table[rest]
  raise ValueError(f'parameter {"/".join(map(str, path))} has no Hugging Face counterpart')


def _scanned(path: tuple) -> bool:
  """'blocks/attn/wq_dnh' ([L, ...], `scan_layers=True`), not 'blocks/3/attn/wq_dnh'."""
  return path[0] == 'blocks' and not isinstance(path[1], int)


def _layer_layouts(path: tuple, cfg: ModelConfig) -> list[Layout]:
  """One Layout per layer: a scanned parameter stacks the L per-layer
  tensors; any other has one."""
  if _scanned(path):
    return [_layout(('blocks', i, *path[1:]), cfg) for i in range(cfg.num_layers)]
  return [_layout(path, cfg)]


def _our_shape(layout: Layout) -> tuple[int, ...]:
  return tuple(layout.split_shape[i] for i in layout.perm)


def _key(entry) -> Any:
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  raise TypeError(entry)


def _paths(tree) -> list[tuple[tuple, Any]]:
  return [(tuple(_key(k) for k in path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


# ----------------------------------------------------------------------------
# Import


class _Tensors:
  """Lazy access to a checkpoint's tensors, single file or sharded with an index."""

  def __init__(self, path: str, stack: contextlib.ExitStack):
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
      with open(index) as f:
        try:
          weight_map = json.load(f)['weight_map']
        except KeyError:
          raise ValueError(f'{index}: no "weight_map"') from None
    elif os.path.exists(os.path.join(path, SINGLE_FILE)):
      weight_map = None
    else:
      raise FileNotFoundError(f'{path}: neither {SINGLE_FILE} nor {INDEX_FILE}')
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
    self._handles = {}
    for name in files:
      file = os.path.join(path, name)
      if not os.path.exists(file):
        raise FileNotFoundError(f'{file} (named in {INDEX_FILE}) does not exist')
      # 'flax' reads bfloat16 too ('numpy' cannot); slices land on the host CPU.
      self._handles[name] = stack.enter_context(safe_open(file, framework='flax'))
    if weight_map is None:
      weight_map = {k: SINGLE_FILE for k in self._handles[SINGLE_FILE].keys()}
    self.weight_map = weight_map
    self.path = path

  def get_slice(self, name: str):
    if name not in self.weight_map:
      raise ValueError(f'{self.path}: the checkpoint has no tensor {name!r}')
    return self._handles[self.weight_map[name]].get_slice(name)

  def where(self, name: str) -> str:
    return os.path.join(self.path, self.weight_map[name])


def _bounds(s: slice, size: int) -> tuple[int, int]:
  start, stop, step = s.indices(size)
  assert step == 1, s
  return start, stop


def _read_shard(tensor, layout: Layout, index: tuple[slice, ...]) -> np.ndarray:
  """Our-layout float32 block `index` of a parameter, reading only the HF
  rows/columns that cover it."""
  split = layout.split_shape
  inv = np.argsort(layout.perm)
  split_index = [index[int(inv[i])] for i in range(len(split))]  # our slices, in HF dim order
  hf_index, rest, dim = [], [], 0
  for group in layout.groups:
    # A contiguous range of the flattened HF axis covers the first dim's slice
    # with the group's trailing dims whole; the trailing slices apply after.
    lo, hi = _bounds(split_index[dim], group[0])
    inner = math.prod(group[1:])
    hf_index.append(slice(lo * inner, hi * inner))
    rest.append(slice(None))
    rest.extend(split_index[dim + 1:dim + len(group)])
    dim += len(group)
  block = np.asarray(tensor[tuple(hf_index)])
  counts = []  # the block's shape split into our dims, first of each group partial
  for group, s in zip(layout.groups, hf_index):
    counts.append((s.stop - s.start) // math.prod(group[1:]))
    counts.extend(group[1:])
  block = block.reshape(counts)[tuple(rest)].transpose(layout.perm)
  return block.astype(np.float32)


def load_params(path: str, cfg: ModelConfig, shardings) -> dict:
  """Loads the checkpoint's weights into our params pure dict.

  Args:
    path: the checkpoint folder.
    cfg: the ModelConfig the params are for (`model_config(path)`).
    shardings: pure dict of NamedShardings, parallel to the params
      (`pipeline.state.model_spec(...).param_shardings`).

  Returns:
    The params pure dict, each array on its sharding, float32.

  Raises:
    ValueError naming the file and tensor when a tensor is missing, has the
    wrong shape, or the checkpoint holds tensors the model has no place for.
  """
  flat = _paths(shardings)
  used = set()
  leaves = []
  # Slices are read on the host: never route them through an accelerator.
  cpu = jax.local_devices(backend='cpu')[0]
  with contextlib.ExitStack() as stack, jax.default_device(cpu):
    tensors = _Tensors(path, stack)
    for our_path, target in flat:
      layouts = _layer_layouts(our_path, cfg)
      sources = []
      for layout in layouts:
        tensor = tensors.get_slice(layout.hf_name)
        shape = tuple(tensor.get_shape())
        if shape != layout.hf_shape:
          raise ValueError(f'{tensors.where(layout.hf_name)}: tensor {layout.hf_name!r} has '
                           f'shape {shape} but config.json implies {layout.hf_shape}')
        sources.append((tensor, layout))
        used.add(layout.hf_name)
      if _scanned(our_path):  # [L, ...]: each device reads its layers' slices
        def read(idx, sources=sources):
          return np.stack([_read_shard(t, l, idx[1:]) for t, l in sources[idx[0]]])
        shape = (len(layouts), *_our_shape(layouts[0]))
      else:
        read = lambda idx, t=tensor, l=layout: _read_shard(t, l, idx)
        shape = _our_shape(layout)
      leaves.append(jax.make_array_from_callback(shape, target, read))
    extra = set(tensors.weight_map) - used
    if cfg.tie_embeddings:
      extra.discard('lm_head.weight')  # some exporters write the tied copy too
    extra = {e for e in extra if not e.endswith('rotary_emb.inv_freq')}
    if extra:
      raise ValueError(f'{path}: tensors the model has no place for (unsupported options?): '
                       f'{sorted(extra)[:8]}')
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shardings), leaves)


# ----------------------------------------------------------------------------
# Export


def export_tensors(params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 host array) for every parameter, one at a time, so a
  writer holds at most one shard's worth of host memory."""
  for our_path, array in _paths(params):
    layouts = _layer_layouts(our_path, cfg)
    for i, layout in enumerate(layouts):
      host = np.asarray(jax.device_get(array[i] if _scanned(our_path) else array), np.float32)
      inv = tuple(int(j) for j in np.argsort(layout.perm))
      yield layout.hf_name, np.ascontiguousarray(host.transpose(inv).reshape(layout.hf_shape))


def save_pretrained(out: str, params, cfg: ModelConfig, *, base_config: dict | None = None,
                    max_shard_bytes: int = 4 << 30) -> None:
  """Writes config.json and float32 safetensors (sharded with an index past
  `max_shard_bytes`) that transformers' `from_pretrained` loads."""
  from safetensors.numpy import save_file
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, CONFIG_FILE), 'w') as f:
    json.dump(hf_config(cfg, base=base_config), f, indent=2)
  shard: dict[str, np.ndarray] = {}
  shard_bytes, total, files, weight_map = 0, 0, [], {}

  def flush():
    files.append(f'model-{len(files) + 1:05d}.safetensors')
    save_file(shard, os.path.join(out, files[-1]), metadata={'format': 'pt'})
    shard.clear()  # frees the host copies

  for name, array in export_tensors(params, cfg):
    if shard and shard_bytes + array.nbytes > max_shard_bytes:
      flush()
      shard_bytes = 0
    shard[name] = array
    shard_bytes += array.nbytes
    total += array.nbytes
    weight_map[name] = len(files)  # index of the shard being filled
  flush()
  if len(files) == 1:
    os.replace(os.path.join(out, files[0]), os.path.join(out, SINGLE_FILE))
    return
  with open(os.path.join(out, INDEX_FILE), 'w') as f:
    json.dump({'metadata': {'total_size': total},
               'weight_map': {k: files[i] for k, i in weight_map.items()}}, f, indent=2)
