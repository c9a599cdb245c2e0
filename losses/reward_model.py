"""Reward model: a scalar head on the last token, trained with Bradley-Terry."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def scalar_head_rewards(hidden_btd: jax.Array, w_d: jax.Array, b: jax.Array | float,
                        last_index_b: jax.Array) -> jax.Array:
  """r(x, y) = w·h_last + b, read at each sequence's last real token.

  Args:
    hidden_btd: [B, T, D] final hidden states.
    w_d: [D] head weight.
    b: scalar head bias.
    last_index_b: [B] int position of each row's last real token (the
      end-of-turn token for right-padded rows). An index outside [0, T) reads
      NaN, so a bad index shows up as a NaN loss rather than a silent reward.

  Returns:
    [B] float32 rewards.
  """
  if hidden_btd.ndim != 3:
    raise ValueError(f'hidden must be [B, T, D], got shape {hidden_btd.shape}')
  B, _, D = hidden_btd.shape
  if w_d.shape != (D,):
    raise ValueError(f'w_d has shape {w_d.shape}, expected [D] = ({D},)')
  if jnp.ndim(b) != 0:
    raise ValueError(f'head bias b must be a scalar, got shape {jnp.shape(b)}')
  if last_index_b.shape != (B,):
    raise ValueError(f'last_index_b has shape {last_index_b.shape}, expected [B] = ({B},)')
  if not jnp.issubdtype(last_index_b.dtype, jnp.integer):
    raise ValueError(f'last_index_b must be integer positions, got dtype {last_index_b.dtype}')
  h_bd = jnp.take_along_axis(hidden_btd, last_index_b[:, None, None], axis=1,
                             mode='fill', fill_value=jnp.nan)[:, 0, :]  # [B, D]
  return h_bd.astype(jnp.float32) @ w_d.astype(jnp.float32) + jnp.asarray(b, jnp.float32)


def bradley_terry_loss(chosen_rewards_b: jax.Array, rejected_rewards_b: jax.Array, *,
                       row_mask_b: jax.Array | None = None):
  """Bradley-Terry pairwise loss -log σ(r(x,y⁺) - r(x,y⁻)), mean over real pairs.

  Args:
    chosen_rewards_b: [B] r(x, y⁺).
    rejected_rewards_b: [B] r(x, y⁻) of the same prompts.
    row_mask_b: [B] 1.0 for real pairs, 0.0 for padding rows; None = all real.

  Returns:
    (loss, metrics) with metric means over real pairs: 'loss', 'accuracy'
    (r⁺ > r⁻), 'margin' (r⁺ - r⁻), 'chosen_reward', 'rejected_reward', and
    'num_pairs'. No real pairs gives loss 0, not NaN.
  """
  if chosen_rewards_b.ndim != 1 or chosen_rewards_b.shape != rejected_rewards_b.shape:
    raise ValueError(f'chosen {chosen_rewards_b.shape} and rejected {rejected_rewards_b.shape} '
                     f'rewards must both be [B]')
  if row_mask_b is not None and row_mask_b.shape != chosen_rewards_b.shape:
    raise ValueError(f'row_mask_b has shape {row_mask_b.shape}, expected {chosen_rewards_b.shape}')
  chosen = chosen_rewards_b.astype(jnp.float32)
  rejected = rejected_rewards_b.astype(jnp.float32)
  mask = (jnp.ones_like(chosen) if row_mask_b is None else row_mask_b.astype(jnp.float32))
  on = mask > 0
  # Zero padding rows before log σ so garbage rewards there cannot make NaNs.
  margin_b = jnp.where(on, chosen - rejected, 0.0)
  num_pairs = jnp.sum(mask)
  denom = jnp.maximum(num_pairs, 1.0)
  loss = -jnp.sum(jax.nn.log_sigmoid(margin_b) * mask) / denom

  def mean(x_b):
    return jnp.sum(jnp.where(on, jax.lax.stop_gradient(x_b), 0.0)) / denom

  metrics = {
      'loss': jax.lax.stop_gradient(loss),
      'accuracy': mean((chosen > rejected).astype(jnp.float32)),
      'margin': mean(margin_b),
      'chosen_reward': mean(chosen),
      'rejected_reward': mean(rejected),
      'num_pairs': num_pairs,
  }
  return loss, metrics
