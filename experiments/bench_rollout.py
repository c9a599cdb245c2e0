"""Rollout speed: the cached sampler against a no-cache decode of the same model.

  python -m experiments.bench_rollout            # prints a table, writes JSON
  python -m experiments.bench_rollout --quick

The no-cache decode re-runs the full forward pass over the whole (prompt +
generated) sequence for every new token, at a fixed padded length so it
compiles once: what a sampler without a KV cache costs.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from models.llama import ModelConfig
from pipeline import sampling, sharding
from pipeline import state as state_lib

_QUICK = flags.DEFINE_bool('quick', False, 'Small sizes, for a smoke run.')
_OUT = flags.DEFINE_string('out', 'experiments/results/bench_rollout.json', 'JSON output.')

MODEL = ModelConfig(vocab_size=1024, d_model=64, num_layers=3, num_heads=2, num_kv_heads=1,
                    head_dim=32, mlp_dim=192)  # the default pipeline's student


@functools.partial(jax.jit, static_argnames=('spec', 'new_tokens'))
def no_cache_greedy(params, prompt_bp, *, spec, new_tokens: int):
  """Greedy decode without a cache: one full forward per generated token."""
  b, p = prompt_bp.shape
  seq = jnp.concatenate([prompt_bp, jnp.zeros((b, new_tokens), jnp.int32)], axis=1)
  positions = jnp.broadcast_to(jnp.arange(p + new_tokens), seq.shape)
  model = state_lib.merge(spec, params)

  def body(i, seq):
    logits = model(seq, positions).logits  # [B, P+N, V]; causal, so later slots are ignored
    token = jnp.argmax(logits[:, p + i - 1], axis=-1).astype(jnp.int32)
    return seq.at[:, p + i].set(token)

  return jax.lax.fori_loop(0, new_tokens, body, seq)


def timed(fn, repeats=3):
  fn()  # compile
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best


def main(argv):
  del argv
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  spec = state_lib.model_spec(MODEL, mesh, ())
  params = state_lib.init_params(spec, 0)
  prompt_len, new_tokens = (32, 32) if _QUICK.value else (64, 128)
  batch_sizes = (4, 16) if _QUICK.value else (8, 32, 64)
  rows = []
  for b in batch_sizes:
    prompts = [np.arange(1, prompt_len + 1, dtype=np.int32) % 1000 + 1] * b
    cfg = sampling.SamplingConfig(max_new_tokens=new_tokens)
    cached = timed(lambda: sampling.generate(spec, params, prompts, cfg, rng=jax.random.key(0),
                                             end_id=-1, pad_id=0).tokens)
    prompt = jnp.asarray(np.stack(prompts))
    plain = timed(lambda: no_cache_greedy(params, prompt, spec=spec, new_tokens=new_tokens))
    rows.append({'batch': b, 'prompt_len': prompt_len, 'new_tokens': new_tokens,
                 'cached_tokens_per_s': b * new_tokens / cached,
                 'no_cache_tokens_per_s': b * new_tokens / plain,
                 'speedup': plain / cached})
  print(f'model: {MODEL.num_params():,} params (d{MODEL.d_model}, {MODEL.num_layers} layers), '
        f'{jax.devices()[0].platform}')
  print('| batch | prompt | new tokens | cached tok/s | no-cache tok/s | speed-up |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | "
          f"{r['cached_tokens_per_s']:,.0f} | {r['no_cache_tokens_per_s']:,.0f} | "
          f"{r['speedup']:.1f}x |")
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump({'model_params': MODEL.num_params(), 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
