"""Masked token cross-entropy (the SFT loss)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """log p(target) per token, float32 [B, T]."""
  logits = logits_btv.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  return picked - logz


def masked_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array,
                         mask_bt: jax.Array, normalizer: jax.Array | float | None = None):
  """Cross-entropy over the masked (response) tokens of the whole batch.

  The mean is over all masked tokens of the global batch, not a mean of
  per-row or per-device means: every response token weighs the same.

  Args:
    logits_btv: [B, T, V] next-token logits.
    targets_bt: [B, T] int target ids.
    mask_bt: [B, T] 1.0 on tokens that count (assistant response tokens of real
      rows), 0.0 elsewhere (prompt, padding).
    normalizer: divide the summed loss by this instead of mask.sum(); gradient
      accumulation passes the token count of the full batch so that
      micro-batch losses add up to the full-batch mean.

  Returns:
    (loss, metrics) with metrics 'loss_sum', 'num_tokens' and 'accuracy'.
    An all-zero mask gives loss 0 (not NaN).
  """
  if logits_btv.ndim != 3:
    raise ValueError(f'logits must be [B, T, V], got shape {logits_btv.shape}')
  if targets_bt.shape != logits_btv.shape[:2] or mask_bt.shape != targets_bt.shape:
    raise ValueError(f'targets {targets_bt.shape} and mask {mask_bt.shape} must both '
                     f'be logits.shape[:2] = {logits_btv.shape[:2]}')
  mask = mask_bt.astype(jnp.float32)
  nll = -token_log_probs(logits_btv, targets_bt)
  loss_sum = jnp.sum(nll * mask)
  num_tokens = jnp.sum(mask)
  denom = jnp.maximum(num_tokens, 1.0) if normalizer is None else normalizer
  correct = (jnp.argmax(logits_btv, axis=-1) == targets_bt).astype(jnp.float32)
  metrics = {'loss_sum': loss_sum, 'num_tokens': num_tokens,
             'correct_sum': jnp.sum(correct * mask)}
  return loss_sum / denom, metrics
