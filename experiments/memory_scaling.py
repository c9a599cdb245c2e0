"""Per-device memory of the train state as FSDP grows: does it shrink as 1/fsdp?

  python -m experiments.memory_scaling            # fsdp = 1, 2, 4, 8 on 8 emulated CPU devices
  python -m experiments.memory_scaling --d_model=1024 --num_layers=8

Builds the real train state (params + AdamW moments + step/rng) with the
pipeline's own code (`pipeline/state.py`, the default rules table) on a
('data', 'fsdp', 'tensor') = (8/fsdp, fsdp, 1) mesh and reads each array's
bytes from the shards the runtime actually placed on each device
(`addressable_shards`), reporting the worst device. Ratio = that over the
same state on one device; the target is within 10% of 1/fsdp. Arrays the
rules leave replicated (RMSNorm scales, the scalar step, the rng, Adam's
counts) do not shrink, hence a model wide enough that they are a sliver.
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import os

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  # Before jax is imported: the emulated devices the meshes are built from.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import json
from collections import defaultdict

import jax
from absl import app, flags

from configs import common
from models.llama import ModelConfig
from pipeline import sharding
from pipeline import state as state_lib
from pipeline.optim import make_optimizer

FLAGS = flags.FLAGS


def model_config(d_model: int, num_layers: int, vocab_size: int) -> ModelConfig:
  """A Llama-shaped model: head_dim 64, GQA 2:1, MLP 3x wide."""
  heads = max(d_model // 64, 1)
  return ModelConfig(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
                     num_heads=heads, num_kv_heads=max(heads // 2, 1), head_dim=64,
                     mlp_dim=3 * d_model)


def per_device_bytes(tree) -> int:
  """Bytes of `tree`'s shards on its fullest device."""
  per_device = defaultdict(int)
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  return max(per_device.values())


def measure(cfg: ModelConfig, fsdp: int, devices, rules=common.DEFAULT_RULES) -> dict:
  """Per-device bytes of params and optimizer state on a (n/fsdp, fsdp, 1) mesh."""
  if len(devices) % fsdp:
    raise ValueError(f'fsdp={fsdp} does not divide the {len(devices)} devices')
  mesh = sharding.make_mesh((len(devices) // fsdp, fsdp, 1), devices)
  with jax.set_mesh(mesh):
    spec = state_lib.model_spec(cfg, mesh, rules)
    params = state_lib.init_params(spec, seed=0)
    tx, _ = make_optimizer(common.optim(), total_steps=100)
    state, _ = state_lib.init_train_state(spec, params, tx, mesh, seed=0)
  out = {'fsdp': fsdp, 'mesh': tuple(mesh.shape.values()),
         'params_bytes': per_device_bytes(state['params']),
         'opt_state_bytes': per_device_bytes(state['opt_state']),
         'total_bytes': per_device_bytes(state)}
  jax.tree.map(lambda x: x.delete(), state)
  return out


def scaling_table(cfg: ModelConfig, fsdps, devices) -> list[dict]:
  """measure() for each fsdp, with ratios to the one-device state."""
  base = measure(cfg, 1, devices[:1])
  rows = []
  for fsdp in fsdps:
    row = measure(cfg, fsdp, devices)
    for k in ('params', 'opt_state', 'total'):
      row[f'{k}_ratio'] = row[f'{k}_bytes'] / base[f'{k}_bytes']
    row['ideal_ratio'] = 1 / fsdp
    row['off_ideal'] = row['total_ratio'] * fsdp - 1  # 0.05 = 5% above 1/fsdp
    rows.append(row)
  return rows


def markdown(rows: list[dict], cfg: ModelConfig) -> str:
  mib = lambda b: f'{b / 2**20:.2f}'
  lines = [f'Model: D={cfg.d_model}, L={cfg.num_layers}, V={cfg.vocab_size}, '
           f'{cfg.num_params() / 1e6:.1f}M params (float32), AdamW; bytes on the fullest device.',
           '',
           '| fsdp | mesh (data, fsdp, tensor) | params MiB | opt state MiB | total MiB '
           '| total / unsharded | 1/fsdp | off 1/fsdp |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['fsdp']} | {r['mesh']} | {mib(r['params_bytes'])} | "
                 f"{mib(r['opt_state_bytes'])} | {mib(r['total_bytes'])} | "
                 f"{r['total_ratio']:.4f} | {r['ideal_ratio']:.4f} | {r['off_ideal']:+.2%} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  cfg = model_config(FLAGS.d_model, FLAGS.num_layers, FLAGS.vocab_size)
  devices = jax.devices()
  fsdps = [int(f) for f in FLAGS.fsdp]
  if max(fsdps) > len(devices):
    raise ValueError(f'--fsdp={max(fsdps)} needs that many devices; {len(devices)} exist')
  rows = scaling_table(cfg, fsdps, devices[:max(fsdps)])
  print(markdown(rows, cfg))
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out, 'w') as f:
    json.dump({'model': cfg.__dict__, 'num_params': cfg.num_params(), 'rows': rows}, f, indent=2)
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  # Defined here, not at import: tests import this module next to others
  # whose flags share names.
  flags.DEFINE_list('fsdp', ['1', '2', '4', '8'], 'FSDP sizes to measure.')
  flags.DEFINE_integer('d_model', 512, 'Model width D.')
  flags.DEFINE_integer('num_layers', 4, 'Layers L.')
  flags.DEFINE_integer('vocab_size', 4096, 'Vocabulary V.')
  flags.DEFINE_string('out', 'experiments/results/memory_scaling.json', 'JSON output.')
  app.run(main)
