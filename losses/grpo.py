"""GRPO: group-relative advantages and the clipped policy-gradient loss.

Symbols follow the papers: G samples per prompt (GRPO, Shao et al. 2024),
ε_low / ε_high clip-higher and token-level mean (DAPO, Yu et al. 2025),
unscaled advantages and a constant length normalizer L (Dr. GRPO, Liu et al.
2025), β-weighted k3 KL to a reference (Schulman, "Approximating KL
divergence", 2020). μ reuses of one rollout batch are the caller's business:
it passes the log-probs the rollout policy gave (`old_logp_bt`).
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

SCALE_REWARDS = ('group', 'batch', 'none')
LOSS_AGGS = ('token_mean', 'seq_mean_token_mean', 'seq_mean_token_sum_norm')


def _as_int(x):
  """x as a Python int if it is an integer (int, numpy int), else None."""
  try:
    return operator.index(x)
  except TypeError:
    return None


def _grouped(rewards_b: jax.Array, group_size: int) -> jax.Array:
  """[B] -> [num_prompts, G] float32, checking B = num_prompts × G."""
  if rewards_b.ndim != 1:
    raise ValueError(f'rewards must be [B], got shape {rewards_b.shape}')
  if _as_int(group_size) is None or group_size < 2:
    raise ValueError(f'group_size G must be an int >= 2 (a group needs two samples '
                     f'to compare), got {group_size!r}')
  if rewards_b.shape[0] % group_size:
    raise ValueError(f'batch of {rewards_b.shape[0]} rewards is not a whole number of '
                     f'groups of G={group_size}; rewards must come as num_prompts × G '
                     f'consecutive samples')
  return rewards_b.astype(jnp.float32).reshape(-1, group_size)  # [P, G]


def zero_variance_groups(rewards_b: jax.Array, group_size: int) -> jax.Array:
  """bool [num_prompts]: True where all G rewards of a prompt are equal.

  Such groups carry no learning signal (every advantage is 0); their mean is
  the `zero_variance_fraction` to log (DAPO's dynamic sampling drops them).
  """
  r_pg = _grouped(rewards_b, group_size)
  return jnp.max(r_pg, axis=1) == jnp.min(r_pg, axis=1)


def group_advantages(rewards_b: jax.Array, group_size: int, *,
                     scale_rewards: str = 'group', eps: float = 1e-4,
                     negative_weight: float = 1.0) -> jax.Array:
  """Group-relative advantages Â_i = (r_i - mean(r_group)) / (std + ε).

  Args:
    rewards_b: [B] float rewards, B = num_prompts × G with each prompt's G
      samples consecutive.
    group_size: G.
    scale_rewards: 'group' divides by the group's std (GRPO); 'batch' by the
      std of all B rewards; 'none' does not divide (Dr. GRPO, which removes the
      difficulty bias of per-group scaling).
    eps: ε added to the std.
    negative_weight: multiplies the negative Â_i (1: GRPO; 0: only the
      better-than-average samples are reinforced, as in online rejection
      sampling fine-tuning).

  Returns:
    [B] float32 advantages. Stds are unbiased (ddof=1, as torch.std in TRL and
    verl). A group whose rewards are all equal gets exactly 0, whatever the
    scaling, rather than float rounding noise.
  """
  if scale_rewards not in SCALE_REWARDS:
    raise ValueError(f'scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}')
  if eps < 0:
    raise ValueError(f'eps must be >= 0, got {eps}')
  if negative_weight < 0:
    raise ValueError(f'negative_weight must be >= 0, got {negative_weight}')
  r_pg = _grouped(rewards_b, group_size)  # [P, G]
  adv_pg = r_pg - jnp.mean(r_pg, axis=1, keepdims=True)
  if scale_rewards == 'group':
    adv_pg = adv_pg / (jnp.std(r_pg, axis=1, ddof=1, keepdims=True) + eps)
  elif scale_rewards == 'batch':
    adv_pg = adv_pg / (jnp.std(r_pg, ddof=1) + eps)
  zero_var_p = zero_variance_groups(rewards_b, group_size)
  adv_pg = jnp.where(zero_var_p[:, None], 0.0, adv_pg)
  adv_pg = jnp.where(adv_pg < 0, negative_weight * adv_pg, adv_pg)
  return adv_pg.reshape(-1)


def token_entropy(logits_btv: jax.Array) -> jax.Array:
  """Entropy H(π(·|context)) of each next-token distribution, float32 [B, T].

  H = logsumexp(z) - Σ_v softmax(z)_v z_v, which needs finite logits.
  """
  if logits_btv.ndim != 3:
    raise ValueError(f'logits must be [B, T, V], got shape {logits_btv.shape}')
  logits = logits_btv.astype(jnp.float32)
  logz_bt = jax.nn.logsumexp(logits, axis=-1)
  p_btv = jax.nn.softmax(logits, axis=-1)
  return logz_bt - jnp.sum(p_btv * logits, axis=-1)


def _check_bt(name: str, x, shape) -> None:
  if x is not None and x.shape != shape:
    raise ValueError(f'{name} has shape {x.shape}, expected {shape} (the shape of logp_bt)')


def grpo_loss(logp_bt: jax.Array, old_logp_bt: jax.Array, advantages_b: jax.Array,
              mask_bt: jax.Array, *, epsilon_low: float = 0.2, epsilon_high: float = 0.28,
              beta: float = 0.0, ref_logp_bt: jax.Array | None = None,
              loss_agg: str = 'token_mean', max_tokens: int | None = None,
              truncated_b: jax.Array | None = None,
              normalizer: jax.Array | float | None = None,
              entropy_bt: jax.Array | None = None):
  """Clipped surrogate loss with clip-higher and optional k3 KL to a reference.

  Per token, with ρ = π_θ/π_old = exp(logp - old_logp):
    ℓ = -min(ρ·Â, clip(ρ, 1-ε_low, 1+ε_high)·Â) + β·k3,
    k3 = exp(ref - logp) - (ref - logp) - 1   (only when β > 0).
  old_logp and ref are constants (stop_gradient). With μ = 1 (logp == old_logp)
  ρ = 1 and ∇ℓ = -Â·∇logp, the plain policy gradient.

  Args:
    logp_bt: [B, T] log π_θ of the sampled tokens (differentiated).
    old_logp_bt: [B, T] log π_old of the same tokens, from the rollout policy.
    advantages_b: [B] Â per completion, broadcast over its tokens.
    mask_bt: [B, T] 1.0 on completion tokens of real rows, 0.0 elsewhere.
    epsilon_low, epsilon_high: ε_low, ε_high of the clip range (DAPO).
    beta: β, the weight of the KL to the reference; 0 keeps no reference
      (ref_logp_bt is then ignored).
    ref_logp_bt: [B, T] log π_ref, required when β > 0.
    loss_agg: 'token_mean' (DAPO): Σ tokens / number of tokens;
      'seq_mean_token_mean' (GRPO): mean over sequences of each one's token
      mean; 'seq_mean_token_sum_norm' (Dr. GRPO): Σ tokens / (num_sequences × L).
      num_sequences counts sequences with at least one token, so padding rows
      and truncated rows change nothing.
    max_tokens: L, the generation budget; required by 'seq_mean_token_sum_norm'.
    truncated_b: [B] bool, completions cut at the budget; all their tokens are
      masked out (DAPO overlong filtering).
    normalizer: divide the aggregated sum ('loss_sum' in the metrics: the token
      sum, or the sum of sequence means for 'seq_mean_token_mean') by this
      instead of the per-call denominator; gradient accumulation passes the
      full batch's denominator so micro-batch losses add up.
    entropy_bt: optional [B, T] per-token entropies (see token_entropy), only
      reported as the 'entropy' metric.

  Returns:
    (loss, metrics). Metrics are token means over the effective mask: 'loss',
    'loss_sum', 'num_tokens', 'num_sequences', 'clip_frac_low' (ρ < 1-ε_low
    with Â < 0), 'clip_frac_high' (ρ > 1+ε_high with Â > 0), 'clip_frac',
    'approx_kl_old' ((ρ-1) - log ρ), 'ratio_mean', and 'kl_ref' when β > 0,
    'entropy' when entropy_bt is given. An all-zero mask gives loss 0 and
    zero gradients, not NaN.
  """
  if loss_agg not in LOSS_AGGS:
    raise ValueError(f'loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}')
  if logp_bt.ndim != 2:
    raise ValueError(f'logp must be [B, T], got shape {logp_bt.shape}')
  shape = logp_bt.shape
  _check_bt('old_logp_bt', old_logp_bt, shape)
  _check_bt('mask_bt', mask_bt, shape)
  _check_bt('ref_logp_bt', ref_logp_bt, shape)
  _check_bt('entropy_bt', entropy_bt, shape)
  if advantages_b.shape != shape[:1]:
    raise ValueError(f'advantages_b has shape {advantages_b.shape}, expected [B] = {shape[:1]}')
  if truncated_b is not None and truncated_b.shape != shape[:1]:
    raise ValueError(f'truncated_b has shape {truncated_b.shape}, expected [B] = {shape[:1]}')
  if not 0.0 <= epsilon_low < 1.0:
    raise ValueError(f'epsilon_low must be in [0, 1), got {epsilon_low}')
  if epsilon_high < 0.0:
    raise ValueError(f'epsilon_high must be >= 0, got {epsilon_high}')
  if beta < 0.0:
    raise ValueError(f'beta must be >= 0, got {beta}')
  if beta > 0.0 and ref_logp_bt is None:
    raise ValueError(f'beta={beta} > 0 needs ref_logp_bt (the reference log-probs); '
                     f'pass them or set beta=0 to train without a reference')
  if loss_agg == 'seq_mean_token_sum_norm' and (
      _as_int(max_tokens) is None or max_tokens < 1):
    raise ValueError(f"loss_agg='seq_mean_token_sum_norm' (Dr. GRPO) needs max_tokens = L, "
                     f'the generation budget as a positive int, got {max_tokens!r}')

  mask = mask_bt.astype(jnp.float32)
  if truncated_b is not None:
    mask = mask * (1.0 - truncated_b.astype(jnp.float32))[:, None]
  on = mask > 0
  logp = logp_bt.astype(jnp.float32)
  old_logp = jax.lax.stop_gradient(old_logp_bt.astype(jnp.float32))
  adv_b1 = jax.lax.stop_gradient(advantages_b.astype(jnp.float32))[:, None]

  # Zero the log-ratio off the mask before exp: padding log-probs can be
  # anything, and an inf there would turn into a NaN gradient.
  log_ratio = jnp.where(on, logp - old_logp, 0.0)
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  per_token = -jnp.minimum(ratio * adv_b1, clipped * adv_b1)
  if beta > 0.0:
    ref_diff = jnp.where(on, jax.lax.stop_gradient(ref_logp_bt.astype(jnp.float32)) - logp, 0.0)
    k3 = jnp.exp(ref_diff) - ref_diff - 1.0
    per_token = per_token + beta * k3
  per_token = per_token * mask

  num_tokens = jnp.sum(mask)
  tokens_b = jnp.sum(mask, axis=1)
  num_sequences = jnp.sum((tokens_b > 0).astype(jnp.float32))
  if loss_agg == 'token_mean':
    loss_sum = jnp.sum(per_token)
    denom = jnp.maximum(num_tokens, 1.0)
  elif loss_agg == 'seq_mean_token_mean':
    loss_sum = jnp.sum(jnp.sum(per_token, axis=1) / jnp.maximum(tokens_b, 1.0))
    denom = jnp.maximum(num_sequences, 1.0)
  else:
    loss_sum = jnp.sum(per_token)
    denom = jnp.maximum(num_sequences, 1.0) * max_tokens
  loss = loss_sum / (denom if normalizer is None else normalizer)

  def token_mean(x_bt):
    return jnp.sum(jnp.where(on, x_bt, 0.0)) / jnp.maximum(num_tokens, 1.0)

  ratio_sg = jax.lax.stop_gradient(ratio)
  low = ((ratio_sg < 1.0 - epsilon_low) & (adv_b1 < 0)).astype(jnp.float32)
  high = ((ratio_sg > 1.0 + epsilon_high) & (adv_b1 > 0)).astype(jnp.float32)
  metrics = {
      'loss': jax.lax.stop_gradient(loss),
      'loss_sum': jax.lax.stop_gradient(loss_sum),
      'num_tokens': num_tokens,
      'num_sequences': num_sequences,
      'clip_frac_low': token_mean(low),
      'clip_frac_high': token_mean(high),
      'clip_frac': token_mean(low + high),
      'approx_kl_old': token_mean((ratio_sg - 1.0) - jax.lax.stop_gradient(log_ratio)),
      'ratio_mean': token_mean(ratio_sg),
  }
  if beta > 0.0:
    metrics['kl_ref'] = token_mean(jax.lax.stop_gradient(k3))
  if entropy_bt is not None:
    metrics['entropy'] = token_mean(jax.lax.stop_gradient(entropy_bt.astype(jnp.float32)))
  return loss, metrics
