"""GRPO advantages and clipped loss against independent numpy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from losses.grpo import group_advantages, grpo_loss, token_entropy, zero_variance_groups

RTOL = 1e-5
ATOL = 1e-6
EPS_LOW, EPS_HIGH = 0.2, 0.28


# ---------------------------------------------------------------- references

def np_advantages(rewards, G, scale, eps=1e-4):
  r = np.asarray(rewards, np.float64).reshape(-1, G)
  adv = np.zeros_like(r)
  for p in range(r.shape[0]):
    group = r[p]
    if np.all(group == group[0]):
      continue  # no signal: exactly 0
    centred = group - group.mean()
    if scale == 'group':
      centred = centred / (np.std(group, ddof=1) + eps)
    elif scale == 'batch':
      centred = centred / (np.std(r.reshape(-1), ddof=1) + eps)
    adv[p] = centred
  return adv.reshape(-1)


def np_grpo(logp, old, adv, mask, agg, *, eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=0.0,
            ref=None, max_tokens=None, truncated=None):
  """Loop over tokens: returns (loss, per-token loss, effective mask, ratios)."""
  logp, old, mask = (np.asarray(x, np.float64) for x in (logp, old, mask))
  mask = mask.copy()
  if truncated is not None:
    mask[np.asarray(truncated, bool)] = 0.0
  B, T = logp.shape
  tok = np.zeros((B, T))
  ratio = np.ones((B, T))
  for i in range(B):
    a = float(adv[i])
    for t in range(T):
      if mask[i, t] == 0:
        continue
      rho = np.exp(logp[i, t] - old[i, t])
      ratio[i, t] = rho
      clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
      tok[i, t] = -min(rho * a, clipped * a)
      if beta > 0:
        d = ref[i, t] - logp[i, t]
        tok[i, t] += beta * (np.exp(d) - d - 1)
  seqs = [i for i in range(B) if mask[i].sum() > 0]
  if agg == 'token_mean':
    loss = tok.sum() / max(mask.sum(), 1)
  elif agg == 'seq_mean_token_mean':
    loss = sum(tok[i].sum() / mask[i].sum() for i in seqs) / max(len(seqs), 1)
  else:
    loss = tok.sum() / (max(len(seqs), 1) * max_tokens)
  return loss, tok, mask, ratio


@pytest.fixture
def batch():
  """4 rows of 6 tokens with ratios inside, below and above the clip range."""
  rng = np.random.default_rng(0)
  B, T = 4, 6
  old = rng.normal(-2.0, 0.5, size=(B, T))
  # log-ratios: inside [log 0.8, log 1.28] and well outside on both sides
  log_ratio = np.array([
      [0.0, 0.1, -0.1, 0.5, -0.5, 0.2],
      [0.6, -0.6, 0.05, 0.3, -0.3, 0.0],
      [-0.4, 0.4, 0.15, -0.15, 0.9, -0.9],
      [0.1, 0.2, 0.3, -0.1, -0.2, -0.3],
  ])
  logp = old + log_ratio
  adv = np.array([1.5, -0.7, 0.9, -1.2])  # positive and negative advantages
  mask = np.ones((B, T))
  mask[0, 4:] = 0.0  # rows of different lengths
  mask[2, 2:] = 0.0
  mask[3, 5:] = 0.0
  return tuple(x.astype(np.float32) for x in (logp, old, adv, mask))


def j(*xs):
  return tuple(jnp.asarray(x) for x in xs)


# ---------------------------------------------------------------- advantages

@pytest.mark.parametrize('scale', ['group', 'batch', 'none'])
def test_advantages_match_numpy(scale):
  rewards = np.array([1.0, 0.0, 0.0, 1.0,   # mixed group
                      0.5, 0.5, 0.5, 0.5,   # zero-variance group
                      0.3, 2.0, -1.0, 0.7], np.float32)
  adv = np.asarray(group_advantages(jnp.asarray(rewards), 4, scale_rewards=scale))
  np.testing.assert_allclose(adv, np_advantages(rewards, 4, scale), rtol=RTOL, atol=ATOL)
  assert np.all(adv[4:8] == 0.0)  # exactly 0, not rounding noise
  np.testing.assert_allclose(adv.reshape(3, 4).sum(1), 0.0, atol=1e-5)


@pytest.mark.parametrize('weight', [0.0, 0.3])
def test_negative_weight_scales_only_negative_advantages(weight):
  rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.3, 2.0, -1.0, 0.7], np.float32)
  expected = np_advantages(rewards, 4, 'group')
  expected = np.where(expected < 0, weight * expected, expected)
  adv = np.asarray(group_advantages(jnp.asarray(rewards), 4, negative_weight=weight))
  np.testing.assert_allclose(adv, expected, rtol=RTOL, atol=ATOL)
  with pytest.raises(ValueError, match='negative_weight'):
    group_advantages(jnp.asarray(rewards), 4, negative_weight=-1.0)


def test_batch_scaling_uses_whole_batch_std():
  rewards = np.array([0.0, 1.0, 0.0, 10.0], np.float32)
  adv = np.asarray(group_advantages(jnp.asarray(rewards), 2, scale_rewards='batch'))
  batch_std = np.std(rewards.astype(np.float64), ddof=1)
  np.testing.assert_allclose(adv, [-0.5 / (batch_std + 1e-4), 0.5 / (batch_std + 1e-4),
                                   -5 / (batch_std + 1e-4), 5 / (batch_std + 1e-4)], rtol=RTOL)


def test_zero_variance_groups_with_rounding_prone_values():
  rewards = np.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.1, 0.2, 0.1], np.float32)
  zv = np.asarray(zero_variance_groups(jnp.asarray(rewards), 3))
  np.testing.assert_array_equal(zv, [True, True, False])
  for scale in ('group', 'batch', 'none'):
    adv = np.asarray(group_advantages(jnp.asarray(rewards), 3, scale_rewards=scale))
    assert np.all(adv[:6] == 0.0) and np.all(adv[6:] != 0.0)


def test_advantages_invalid_arguments():
  r = jnp.zeros(6)
  with pytest.raises(ValueError, match='not a whole number of groups'):
    group_advantages(r, 4)
  with pytest.raises(ValueError, match='G must be an int >= 2'):
    group_advantages(r, 1)
  with pytest.raises(ValueError, match='G must be an int >= 2'):
    zero_variance_groups(r, 1)
  with pytest.raises(ValueError, match="scale_rewards must be one of"):
    group_advantages(r, 3, scale_rewards='std')
  with pytest.raises(ValueError, match=r'rewards must be \[B\]'):
    group_advantages(jnp.zeros((2, 3)), 3)


# ---------------------------------------------------------------- loss values

AGGS = ['token_mean', 'seq_mean_token_mean', 'seq_mean_token_sum_norm']


@pytest.mark.parametrize('agg', AGGS)
def test_loss_matches_numpy(batch, agg):
  logp, old, adv, mask = batch
  loss, metrics = grpo_loss(*j(logp, old, adv, mask), loss_agg=agg, max_tokens=8)
  ref_loss, tok, _, _ = np_grpo(logp, old, adv, mask, agg, max_tokens=8)
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
  np.testing.assert_allclose(metrics['loss'], ref_loss, rtol=RTOL)
  assert float(metrics['num_tokens']) == mask.sum() and float(metrics['num_sequences']) == 4


@pytest.mark.parametrize('agg', AGGS)
@pytest.mark.parametrize('log_ratio', [0.0, 0.1, -0.1, 0.6, -0.6])
@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_clip_situations(agg, log_ratio, sign):
  """One ratio for every token: inside, below and above the clip range, A ≷ 0."""
  rng = np.random.default_rng(1)
  old = rng.normal(-1.0, 0.3, size=(3, 5)).astype(np.float32)
  logp = (old + log_ratio).astype(np.float32)
  adv = (sign * np.array([0.5, 1.0, 2.0])).astype(np.float32)
  mask = np.ones((3, 5), np.float32)
  mask[1, 3:] = 0.0
  loss, metrics = grpo_loss(*j(logp, old, adv, mask), loss_agg=agg, max_tokens=5)
  ref_loss, _, _, _ = np_grpo(logp, old, adv, mask, agg, max_tokens=5)
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, atol=ATOL)
  rho = np.exp(log_ratio)
  want_low = float(rho < 1 - EPS_LOW and sign < 0)
  want_high = float(rho > 1 + EPS_HIGH and sign > 0)
  assert float(metrics['clip_frac_low']) == want_low
  assert float(metrics['clip_frac_high']) == want_high


def test_clip_fractions_and_old_kl_match_numpy(batch):
  logp, old, adv, mask = batch
  _, metrics = grpo_loss(*j(logp, old, adv, mask))
  _, _, m, ratio = np_grpo(logp, old, adv, mask, 'token_mean')
  a = adv[:, None].astype(np.float64)
  low = ((ratio < 1 - EPS_LOW) & (a < 0)) * m
  high = ((ratio > 1 + EPS_HIGH) & (a > 0)) * m
  assert low.sum() > 0 and high.sum() > 0  # the fixture exercises both
  n = m.sum()
  np.testing.assert_allclose(metrics['clip_frac_low'], low.sum() / n, rtol=RTOL)
  np.testing.assert_allclose(metrics['clip_frac_high'], high.sum() / n, rtol=RTOL)
  np.testing.assert_allclose(metrics['clip_frac'], (low + high).sum() / n, rtol=RTOL)
  kl = ((ratio - 1) - np.log(ratio)) * m
  np.testing.assert_allclose(metrics['approx_kl_old'], kl.sum() / n, rtol=RTOL)
  np.testing.assert_allclose(metrics['ratio_mean'], (ratio * m).sum() / n, rtol=RTOL)


@pytest.mark.parametrize('agg', AGGS)
def test_beta_adds_k3_kl_to_reference(batch, agg):
  logp, old, adv, mask = batch
  ref = (logp + np.random.default_rng(2).normal(0, 0.3, logp.shape)).astype(np.float32)
  loss, metrics = grpo_loss(*j(logp, old, adv, mask), loss_agg=agg, max_tokens=8,
                            beta=0.05, ref_logp_bt=jnp.asarray(ref))
  ref_loss, _, m, _ = np_grpo(logp, old, adv, mask, agg, max_tokens=8, beta=0.05, ref=ref)
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
  d = ref.astype(np.float64) - logp
  k3 = (np.exp(d) - d - 1) * m
  np.testing.assert_allclose(metrics['kl_ref'], k3.sum() / m.sum(), rtol=RTOL)
  # β = 0 ignores the reference entirely.
  no_beta, metrics0 = grpo_loss(*j(logp, old, adv, mask), loss_agg=agg, max_tokens=8,
                                ref_logp_bt=jnp.asarray(ref))
  np.testing.assert_allclose(no_beta, np_grpo(logp, old, adv, mask, agg, max_tokens=8)[0],
                             rtol=RTOL)
  assert 'kl_ref' not in metrics0


@pytest.mark.parametrize('agg', AGGS)
def test_truncated_rows_are_masked_out(batch, agg):
  logp, old, adv, mask = batch
  truncated = np.array([False, True, False, False])
  loss, metrics = grpo_loss(*j(logp, old, adv, mask), loss_agg=agg, max_tokens=8,
                            truncated_b=jnp.asarray(truncated))
  ref_loss, _, m, _ = np_grpo(logp, old, adv, mask, agg, max_tokens=8, truncated=truncated)
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
  assert float(metrics['num_tokens']) == m.sum() and float(metrics['num_sequences']) == 3
  # Same as dropping the row.
  keep = ~truncated
  dropped, _ = grpo_loss(*j(logp[keep], old[keep], adv[keep], mask[keep]), loss_agg=agg,
                         max_tokens=8)
  np.testing.assert_allclose(loss, dropped, rtol=RTOL)


@pytest.mark.parametrize('agg', AGGS)
def test_padding_invariance(batch, agg):
  """Extra pad columns and an all-pad row with garbage log-probs change nothing."""
  logp, old, adv, mask = batch
  rng = np.random.default_rng(3)
  pad_cols = lambda x, fill: np.concatenate([x, fill], 1)
  logp_p = pad_cols(logp, rng.normal(0, 50, (4, 3)).astype(np.float32))
  old_p = pad_cols(old, np.full((4, 3), -1e9, np.float32))  # would overflow exp
  mask_p = pad_cols(mask, np.zeros((4, 3), np.float32))
  logp_p = np.concatenate([logp_p, rng.normal(0, 50, (1, 9)).astype(np.float32)])
  old_p = np.concatenate([old_p, np.full((1, 9), 1e9, np.float32)])
  mask_p = np.concatenate([mask_p, np.zeros((1, 9), np.float32)])
  adv_p = np.concatenate([adv, np.array([3.0], np.float32)])
  a, _ = grpo_loss(*j(logp, old, adv, mask), loss_agg=agg, max_tokens=8)
  fn = lambda lp: grpo_loss(lp, *j(old_p, adv_p, mask_p), loss_agg=agg, max_tokens=8)[0]
  b, grad = jax.value_and_grad(fn)(jnp.asarray(logp_p))
  np.testing.assert_allclose(a, b, rtol=RTOL)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[mask_p == 0] == 0.0)


@pytest.mark.parametrize('agg', AGGS)
def test_all_masked_gives_zero_and_finite_gradients(batch, agg):
  logp, old, adv, mask = batch
  zeros = np.zeros_like(mask)
  fn = lambda lp: grpo_loss(lp, *j(old, adv, zeros), loss_agg=agg, max_tokens=8, beta=0.1,
                            ref_logp_bt=jnp.asarray(old))
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logp))
  assert float(loss) == 0.0
  assert all(np.isfinite(v) for v in jax.tree.leaves(metrics))
  assert np.all(np.asarray(grad) == 0.0)
  # All rows truncated is the same thing.
  loss_t, _ = grpo_loss(*j(logp, old, adv, mask), loss_agg=agg, max_tokens=8,
                        truncated_b=jnp.ones(4, bool))
  assert float(loss_t) == 0.0


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize('agg', AGGS)
def test_mu1_gradient_is_policy_gradient(batch, agg):
  """logp == old_logp: ∇ loss = -A·∇logp / (the aggregation's denominator)."""
  _, old, adv, mask = batch
  fn = lambda lp: grpo_loss(lp, jnp.asarray(old), *j(adv, mask), loss_agg=agg, max_tokens=8)[0]
  grad = np.asarray(jax.grad(fn)(jnp.asarray(old)), np.float64)
  m = mask.astype(np.float64)
  a = adv[:, None].astype(np.float64)
  if agg == 'token_mean':
    want = -a * m / m.sum()
  elif agg == 'seq_mean_token_mean':
    want = -a * m / m.sum(1, keepdims=True) / 4
  else:
    want = -a * m / (4 * 8)
  np.testing.assert_allclose(grad, want, rtol=RTOL, atol=1e-8)


def test_clipped_tokens_get_no_gradient(batch):
  logp, old, adv, mask = batch
  fn = lambda lp: grpo_loss(lp, *j(old, adv, mask))[0]
  grad = np.asarray(jax.grad(fn)(jnp.asarray(logp)), np.float64)
  _, _, m, ratio = np_grpo(logp, old, adv, mask, 'token_mean')
  a = adv[:, None].astype(np.float64)
  clipped = (((ratio < 1 - EPS_LOW) & (a < 0)) | ((ratio > 1 + EPS_HIGH) & (a > 0))) & (m > 0)
  assert clipped.any()
  assert np.all(grad[clipped] == 0.0)
  live = (m > 0) & ~clipped
  # d/dlogp of -ρ·A is -ρ·A
  np.testing.assert_allclose(grad[live], (-ratio * a / m.sum())[live], rtol=RTOL)


def test_old_and_ref_get_no_gradient(batch):
  logp, old, adv, mask = batch
  fn = lambda o, r: grpo_loss(*j(logp), o, *j(adv, mask), beta=0.1, ref_logp_bt=r)[0]
  g_old, g_ref = jax.grad(fn, argnums=(0, 1))(jnp.asarray(old), jnp.asarray(logp) + 0.1)
  assert np.all(np.asarray(g_old) == 0.0) and np.all(np.asarray(g_ref) == 0.0)


def test_normalizer_replaces_denominator(batch):
  logp, old, adv, mask = batch
  loss, metrics = grpo_loss(*j(logp, old, adv, mask), normalizer=7.0)
  np.testing.assert_allclose(loss, float(metrics['loss_sum']) / 7.0, rtol=RTOL)
  # Two micro-batches with the full-batch token count sum to the full loss.
  full, _ = grpo_loss(*j(logp, old, adv, mask))
  n = float(mask.sum())
  halves = [grpo_loss(*j(logp[s], old[s], adv[s], mask[s]), normalizer=n)[0]
            for s in (slice(0, 2), slice(2, 4))]
  np.testing.assert_allclose(sum(halves), full, rtol=RTOL)


# ---------------------------------------------------------------- entropy

def test_token_entropy_and_entropy_metric(batch):
  logp, old, adv, mask = batch
  logits = np.random.default_rng(4).normal(0, 3, (4, 6, 13)).astype(np.float32)
  ent = np.asarray(token_entropy(jnp.asarray(logits)))
  z = logits.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = -(p * np.log(p)).sum(-1)
  np.testing.assert_allclose(ent, want, rtol=RTOL, atol=ATOL)
  _, metrics = grpo_loss(*j(logp, old, adv, mask), entropy_bt=jnp.asarray(ent))
  np.testing.assert_allclose(metrics['entropy'], (want * mask).sum() / mask.sum(), rtol=RTOL)
  with pytest.raises(ValueError, match=r'logits must be \[B, T, V\]'):
    token_entropy(jnp.zeros((4, 6)))


def test_jit_with_static_options(batch):
  logp, old, adv, mask = batch
  fn = jax.jit(lambda lp, o, a, m, r: grpo_loss(lp, o, a, m, loss_agg='seq_mean_token_sum_norm',
                                                max_tokens=8, beta=0.1, ref_logp_bt=r))
  loss, _ = fn(*j(logp, old, adv, mask, old))
  ref = np_grpo(logp, old, adv, mask, 'seq_mean_token_sum_norm', max_tokens=8, beta=0.1,
                ref=old)[0]
  np.testing.assert_allclose(loss, ref, rtol=RTOL)


# ---------------------------------------------------------------- invalid arguments

def test_loss_invalid_arguments(batch):
  logp, old, adv, mask = j(*batch)
  with pytest.raises(ValueError, match='loss_agg must be one of'):
    grpo_loss(logp, old, adv, mask, loss_agg='sum')
  with pytest.raises(ValueError, match='needs ref_logp_bt'):
    grpo_loss(logp, old, adv, mask, beta=0.1)
  with pytest.raises(ValueError, match='needs max_tokens'):
    grpo_loss(logp, old, adv, mask, loss_agg='seq_mean_token_sum_norm')
  with pytest.raises(ValueError, match='needs max_tokens'):
    grpo_loss(logp, old, adv, mask, loss_agg='seq_mean_token_sum_norm', max_tokens=0)
  with pytest.raises(ValueError, match=r'old_logp_bt has shape \(4, 5\)'):
    grpo_loss(logp, old[:, :5], adv, mask)
  with pytest.raises(ValueError, match='mask_bt has shape'):
    grpo_loss(logp, old, adv, mask[:3])
  with pytest.raises(ValueError, match='ref_logp_bt has shape'):
    grpo_loss(logp, old, adv, mask, beta=0.1, ref_logp_bt=old[:, :2])
  with pytest.raises(ValueError, match=r'advantages_b has shape \(4, 1\)'):
    grpo_loss(logp, old, adv[:, None], mask)
  with pytest.raises(ValueError, match='truncated_b has shape'):
    grpo_loss(logp, old, adv, mask, truncated_b=jnp.zeros(3, bool))
  with pytest.raises(ValueError, match='entropy_bt has shape'):
    grpo_loss(logp, old, adv, mask, entropy_bt=jnp.zeros(4))
  with pytest.raises(ValueError, match=r'logp must be \[B, T\]'):
    grpo_loss(logp[0], old[0], adv, mask[0])
  with pytest.raises(ValueError, match='epsilon_low'):
    grpo_loss(logp, old, adv, mask, epsilon_low=1.0)
  with pytest.raises(ValueError, match='beta must be >= 0'):
    grpo_loss(logp, old, adv, mask, beta=-0.1)
