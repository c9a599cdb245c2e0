"""Batched generation over a preallocated KV cache.

Prompts are left-padded to a bucketed length P so that one compiled program
serves every prompt batch of that bucket; the cache holds P + max_new_tokens
slots. Prefill writes the prompt in one forward pass, then a `lax.while_loop`
decodes one token per row per iteration until every row has emitted the
end-of-turn token or max_new_tokens is reached.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.llama import KVCache
from pipeline import sharding
from pipeline import state as state_lib


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off


@dataclasses.dataclass
class Samples:
  tokens: np.ndarray  # [B, max_new_tokens] int32, pad_id after the end token
  log_probs: np.ndarray  # [B, max_new_tokens] float32 log π(token), 0 after the end
  lengths: np.ndarray  # [B] generated tokens including the end token
  truncated: np.ndarray  # [B] bool: hit max_new_tokens without an end token


def filter_logits(logits_bv: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Top-k then nucleus (top-p) filtering; removed entries become -inf."""
  if top_k > 0:
    kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always the first token).
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff_idx = jnp.sum(before < top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_desc, cutoff_idx, axis=-1)
    logits_bv = jnp.where(logits_bv < cutoff, -jnp.inf, logits_bv)
  return logits_bv


def _pick(logits_bv, rng, cfg: SamplingConfig):
  """Next token and its log-prob under the (temperature-scaled) policy."""
  if cfg.temperature == 0.0:
    token = jnp.argmax(logits_bv, axis=-1)
    logp = jax.nn.log_softmax(logits_bv, axis=-1)
  else:
    scaled = filter_logits(logits_bv / cfg.temperature, cfg.top_k, cfg.top_p)
    token = jax.random.categorical(rng, scaled, axis=-1)
    logp = jax.nn.log_softmax(scaled, axis=-1)
  return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=('spec', 'cfg', 'end_id', 'pad_id'))
def _generate(params, prompt_bp, prompt_mask_bp, rng, *, spec, cfg: SamplingConfig,
              end_id: int, pad_id: int):
  model = state_lib.merge(spec, params)
  b, p = prompt_bp.shape
  n = cfg.max_new_tokens
  cache = KVCache.init(spec.config, b, p + n)
  positions = jnp.maximum(jnp.cumsum(prompt_mask_bp, axis=1) - 1, 0)  # [B, P]
  out = model(prompt_bp, positions, prompt_mask_bp.astype(jnp.int32), cache=cache)
  next_pos = positions[:, -1] + 1  # [B]
  rng, sub = jax.random.split(rng)
  token, logp = _pick(out.logits[:, -1], sub, cfg)

  tokens = jnp.full((b, n), pad_id, jnp.int32)
  log_probs = jnp.zeros((b, n), jnp.float32)
  done = jnp.zeros((b,), jnp.bool_)

  def cond(carry):
    i, _, _, _, _, done, *_ = carry
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, token, logp, tokens, log_probs, done, cache, pos, rng = carry
    tokens = tokens.at[:, i].set(jnp.where(done, pad_id, token))
    log_probs = log_probs.at[:, i].set(jnp.where(done, 0.0, logp))
    done = done | (token == end_id)
    out = model(token[:, None], pos[:, None], jnp.ones((b, 1), jnp.int32), cache=cache)
    rng, sub = jax.random.split(rng)
    new_token, new_logp = _pick(out.logits[:, 0], sub, cfg)
    return i + 1, new_token, new_logp, tokens, log_probs, done, out.cache, pos + 1, rng

  carry = (jnp.int32(0), token, logp, tokens, log_probs, done, out.cache, next_pos, rng)
  _, _, _, tokens, log_probs, *_ = jax.lax.while_loop(cond, body, carry)
  return tokens, log_probs


def bucket(n: int, minimum: int = 16) -> int:
  """Next power of two ≥ n: a handful of compiled shapes serve all lengths."""
  return max(minimum, 1 << max(n - 1, 0).bit_length())


def generate(spec: state_lib.ModelSpec, params, prompts: Sequence[np.ndarray],
             cfg: SamplingConfig, *, rng: jax.Array, end_id: int, pad_id: int,
             batch_size: int | None = None) -> Samples:
  """Samples one completion per prompt (repeat prompts for G samples each).

  Prompts are grouped into batches of `batch_size` (padded with dummy rows to
  a fixed batch so the compiled shape is reused), left-padded to a power-of-two
  length bucket.
  """
  batch_size = batch_size or len(prompts)
  results = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)
    p = bucket(max(len(x) for x in chunk))
    prompt = np.full((batch_size, p), pad_id, np.int32)
    mask = np.zeros((batch_size, p), np.bool_)
    for i, ids in enumerate(chunk):
      prompt[i, p - len(ids):] = ids
      mask[i, p - len(ids):] = True
    rng, sub = jax.random.split(rng)
    tokens, log_probs = sharding.to_host(_generate(
        params, prompt, mask, sub, spec=spec, cfg=cfg, end_id=end_id, pad_id=pad_id))
    results.append((tokens[:real], log_probs[:real]))
  tokens = np.concatenate([r[0] for r in results])
  log_probs = np.concatenate([r[1] for r in results])
  is_end = tokens == end_id
  lengths = np.where(is_end.any(axis=1), is_end.argmax(axis=1) + 1, cfg.max_new_tokens)
  return Samples(tokens, log_probs, lengths.astype(np.int32), ~is_end.any(axis=1))


def prompt_completion_row(prompt_ids: np.ndarray, completion_ids: np.ndarray,
                          length: int) -> dict[str, np.ndarray]:
  """prompt + completion as one training row of `length` (inputs, targets,
  positions, and a mask on the completion's tokens only), right-padded."""
  ids = np.concatenate([prompt_ids, completion_ids])[:length + 1]
  mask = np.zeros(len(ids), np.float32)
  mask[len(prompt_ids):] = 1.0
  row = {k: np.zeros(length, np.int32) for k in ('inputs', 'targets', 'positions')}
  row['mask'] = np.zeros(length, np.float32)
  n = len(ids) - 1
  row['inputs'][:n], row['targets'][:n], row['mask'][:n] = ids[:-1], ids[1:], mask[1:]
  row['positions'][:n] = np.arange(n)
  return row


def completion_ids(samples: Samples, i: int) -> np.ndarray:
  """Row i's generated tokens, including its end token when it has one."""
  return samples.tokens[i, :samples.lengths[i]]
