"""Bradley-Terry loss and the scalar reward head against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from losses.reward_model import bradley_terry_loss, scalar_head_rewards

RTOL = 1e-5


def np_bt(chosen, rejected, mask):
  c, r, m = (np.asarray(x, np.float64) for x in (chosen, rejected, mask))
  d = c - r
  nll = np.log1p(np.exp(-np.abs(d))) + np.maximum(-d, 0)  # -log σ(d), stable
  n = max(m.sum(), 1.0)
  return {'loss': (nll * m).sum() / n, 'accuracy': ((c > r) * m).sum() / n,
          'margin': (d * m).sum() / n, 'chosen_reward': (c * m).sum() / n,
          'rejected_reward': (r * m).sum() / n}


@pytest.fixture
def pairs():
  rng = np.random.default_rng(0)
  chosen = rng.normal(0, 3, 8).astype(np.float32)
  rejected = rng.normal(0, 3, 8).astype(np.float32)
  chosen[0], rejected[0] = 40.0, -40.0  # saturated both ways: log σ must stay stable
  chosen[1], rejected[1] = -40.0, 40.0
  return chosen, rejected


def test_matches_numpy(pairs):
  chosen, rejected = pairs
  loss, metrics = bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected))
  want = np_bt(chosen, rejected, np.ones(8))
  np.testing.assert_allclose(loss, want['loss'], rtol=RTOL)
  for k, v in want.items():
    np.testing.assert_allclose(metrics[k], v, rtol=RTOL, atol=1e-7, err_msg=k)
  assert float(metrics['num_pairs']) == 8


def test_row_mask_drops_padding_pairs(pairs):
  chosen, rejected = pairs
  mask = np.array([1, 1, 0, 1, 0, 1, 1, 0], np.float32)
  rejected = rejected.copy()
  rejected[2] = np.inf  # garbage on a padding row must not leak
  loss, metrics = bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected),
                                     row_mask_b=jnp.asarray(mask))
  keep = mask > 0
  want = np_bt(chosen[keep], rejected[keep], np.ones(keep.sum()))
  for k, v in want.items():
    np.testing.assert_allclose(metrics[k], v, rtol=RTOL, atol=1e-7, err_msg=k)
  np.testing.assert_allclose(loss, want['loss'], rtol=RTOL)
  zero, m0 = bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected),
                                row_mask_b=jnp.zeros(8))
  assert float(zero) == 0.0 and all(np.isfinite(v) for v in jax.tree.leaves(m0))


def test_gradient_sign(pairs):
  """Descending the loss raises the chosen reward and lowers the rejected one."""
  chosen, rejected = pairs
  g_c, g_r = jax.grad(lambda c, r: bradley_terry_loss(c, r)[0], argnums=(0, 1))(
      jnp.asarray(chosen), jnp.asarray(rejected))
  g_c, g_r = np.asarray(g_c, np.float64), np.asarray(g_r, np.float64)
  assert np.all(g_c < 0) and np.all(g_r > 0)
  d = chosen.astype(np.float64) - rejected
  np.testing.assert_allclose(g_c, -(1 / (1 + np.exp(d))) / 8, rtol=RTOL, atol=1e-12)
  np.testing.assert_allclose(g_r, -g_c, rtol=RTOL)


def test_scalar_head_reads_last_real_token():
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(3, 7, 5)).astype(np.float32)
  w = rng.normal(size=5).astype(np.float32)
  last = np.array([6, 0, 3], np.int32)
  r = scalar_head_rewards(jnp.asarray(hidden), jnp.asarray(w), 0.25, jnp.asarray(last))
  want = np.array([hidden[i, last[i]].astype(np.float64) @ w + 0.25 for i in range(3)])
  np.testing.assert_allclose(r, want, rtol=RTOL)
  # Changing any other position leaves the rewards alone.
  other = hidden.copy()
  for i in range(3):
    other[i, np.arange(7) != last[i]] = 99.0
  r2 = scalar_head_rewards(jnp.asarray(other), jnp.asarray(w), 0.25, jnp.asarray(last))
  np.testing.assert_allclose(r2, r, rtol=RTOL)
  # bf16 hidden states still give float32 rewards.
  r3 = scalar_head_rewards(jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(w), 0.25,
                           jnp.asarray(last))
  assert r3.dtype == jnp.float32


def test_scalar_head_out_of_range_index_is_nan():
  hidden = jnp.ones((2, 4, 3))
  r = scalar_head_rewards(hidden, jnp.ones(3), 0.0, jnp.array([3, 4]))
  assert np.isfinite(r[0]) and np.isnan(r[1])


def test_invalid_arguments():
  with pytest.raises(ValueError, match='must both be'):
    bradley_terry_loss(jnp.zeros(3), jnp.zeros(4))
  with pytest.raises(ValueError, match='must both be'):
    bradley_terry_loss(jnp.zeros((3, 1)), jnp.zeros((3, 1)))
  with pytest.raises(ValueError, match='row_mask_b has shape'):
    bradley_terry_loss(jnp.zeros(3), jnp.zeros(3), row_mask_b=jnp.ones(2))
  h = jnp.zeros((2, 4, 3))
  with pytest.raises(ValueError, match=r'hidden must be \[B, T, D\]'):
    scalar_head_rewards(h[0], jnp.zeros(3), 0.0, jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match='w_d has shape'):
    scalar_head_rewards(h, jnp.zeros(4), 0.0, jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match='must be a scalar'):
    scalar_head_rewards(h, jnp.zeros(3), jnp.zeros(2), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match='last_index_b has shape'):
    scalar_head_rewards(h, jnp.zeros(3), 0.0, jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match='integer positions'):
    scalar_head_rewards(h, jnp.zeros(3), 0.0, jnp.zeros(2))
