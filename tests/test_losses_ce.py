"""Masked cross-entropy against an independent numpy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from losses.ce import masked_cross_entropy


def numpy_masked_ce(logits, targets, mask):
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return (nll * mask).sum() / max(mask.sum(), 1.0)


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(3, 7))
  mask = (rng.random((3, 7)) < 0.6).astype(np.float32)
  mask[2] = 0.0  # an all-padding row
  return logits, targets, mask


def test_matches_numpy(batch):
  logits, targets, mask = batch
  loss, metrics = masked_cross_entropy(jnp.array(logits), jnp.array(targets), jnp.array(mask))
  np.testing.assert_allclose(loss, numpy_masked_ce(logits, targets, mask), rtol=1e-6)
  assert metrics['num_tokens'] == mask.sum()


def test_global_token_mean_not_mean_of_rows(batch):
  logits, targets, mask = batch
  mask[0, :] = 1.0
  mask[1, :] = 0.0
  mask[1, 0] = 1.0  # rows with 7 and 1 tokens: each token weighs the same
  loss, _ = masked_cross_entropy(jnp.array(logits), jnp.array(targets), jnp.array(mask))
  np.testing.assert_allclose(loss, numpy_masked_ce(logits, targets, mask), rtol=1e-6)


def test_padding_does_not_change_loss(batch):
  logits, targets, mask = batch
  padded_logits = np.concatenate([logits, np.random.randn(3, 5, 11).astype(np.float32)], 1)
  padded_targets = np.concatenate([targets, np.zeros((3, 5), int)], 1)
  padded_mask = np.concatenate([mask, np.zeros((3, 5), np.float32)], 1)
  a, _ = masked_cross_entropy(jnp.array(logits), jnp.array(targets), jnp.array(mask))
  b, _ = masked_cross_entropy(jnp.array(padded_logits), jnp.array(padded_targets),
                              jnp.array(padded_mask))
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_empty_mask_gives_zero_not_nan(batch):
  logits, targets, mask = batch
  loss, metrics = masked_cross_entropy(jnp.array(logits), jnp.array(targets),
                                       jnp.zeros_like(jnp.array(mask)))
  assert float(loss) == 0.0 and float(metrics['num_tokens']) == 0.0


def test_normalizer_sums_micro_batches(batch):
  logits, targets, mask = batch
  full, _ = masked_cross_entropy(jnp.array(logits), jnp.array(targets), jnp.array(mask))
  total = mask.sum()
  parts = [masked_cross_entropy(jnp.array(logits[i:i + 1]), jnp.array(targets[i:i + 1]),
                                jnp.array(mask[i:i + 1]), normalizer=total)[0] for i in range(3)]
  np.testing.assert_allclose(sum(parts), full, rtol=1e-6)


@pytest.mark.parametrize('shapes', [((3, 7), (3, 7), (3, 7)),  # logits not 3-D
                                    ((3, 7, 11), (3, 6), (3, 6)),
                                    ((3, 7, 11), (3, 7), (3, 6))])
def test_invalid_shapes(shapes):
  ls, ts, ms = shapes
  with pytest.raises(ValueError, match='must'):
    masked_cross_entropy(jnp.zeros(ls), jnp.zeros(ts, jnp.int32), jnp.zeros(ms))
