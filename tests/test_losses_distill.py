"""Distillation losses against independent float64 numpy references.

The numpy functions below are written from the formulas in losses/distill.py's
docstrings (and the GKD / DPO papers), not by calling the JAX code.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from losses.distill import (dpo_loss, hidden_state_loss, logit_kl, preference_distillation_loss,
                            sequence_log_probs, uniform_layer_map)

RTOL, ATOL = 1e-5, 1e-6
B, T, V = 3, 7, 11


# ----------------------------------------------------------------- numpy references

def np_log_softmax(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_kl(p, q):
  """KL(p || q) per row of probability vectors, 0·log 0 = 0."""
  with np.errstate(divide='ignore', invalid='ignore'):
    terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
  return terms.sum(-1)


def np_token_div(student, teacher, tau, direction, beta=0.5, top_k=0):
  """[B, T] τ²-scaled divergence per token."""
  s, t = student.astype(np.float64) / tau, teacher.astype(np.float64) / tau
  if top_k:
    idx = np.argsort(-t, axis=-1)[..., :top_k]
    s, t = np.take_along_axis(s, idx, -1), np.take_along_axis(t, idx, -1)
  ps, pt = np.exp(np_log_softmax(s)), np.exp(np_log_softmax(t))
  if direction == 'forward':
    d = np_kl(pt, ps)
  elif direction == 'reverse':
    d = np_kl(ps, pt)
  else:
    m = beta * pt + (1 - beta) * ps
    d = beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)
  return tau ** 2 * d


def np_logit_kl(student, teacher, mask, tau=1.0, direction='forward', beta=0.5, top_k=0):
  d = np_token_div(student, teacher, tau, direction, beta, top_k)
  return (d * mask).sum() / max(mask.sum(), 1.0)


def np_hidden(hs, ht, w, mask, layer_map, kind):
  total = 0.0
  for p, (i, j) in enumerate(layer_map):
    wp = w if w.ndim == 2 else w[p]
    x = hs[i].astype(np.float64) @ wp.astype(np.float64)
    y = ht[j].astype(np.float64)
    if kind == 'mse':
      per = ((x - y) ** 2).mean(-1)
    else:
      per = 1 - (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    total += (per * mask).sum() / max(mask.sum(), 1.0)
  return total / len(layer_map)


def np_seq_logp(logits, targets, mask):
  lp = np_log_softmax(logits)
  return (np.take_along_axis(lp, targets[..., None], -1)[..., 0] * mask).sum(-1)


def np_dpo(pc, pr, rc, rr, beta, row_mask):
  z = beta * ((pc - rc) - (pr - rr))
  nll = np.log1p(np.exp(-z))  # -log σ(z)
  return (nll * row_mask).sum() / max(row_mask.sum(), 1.0), z


# ----------------------------------------------------------------- fixtures

@pytest.fixture
def logits():
  rng = np.random.default_rng(0)
  student = (rng.normal(size=(B, T, V)) * 2).astype(np.float32)
  teacher = (rng.normal(size=(B, T, V)) * 2).astype(np.float32)
  mask = (rng.random((B, T)) < 0.6).astype(np.float32)
  mask[2] = 0.0  # a padding row
  return student, teacher, mask


def kl(student, teacher, mask, **kw):
  return logit_kl(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask), **kw)


# ----------------------------------------------------------------- logit_kl

@pytest.mark.parametrize('direction,beta', [('forward', 0.5), ('reverse', 0.5), ('jsd', 0.1),
                                            ('jsd', 0.5), ('jsd', 0.9)])
@pytest.mark.parametrize('tau', [1.0, 2.0, 0.5])
def test_logit_kl_matches_numpy(logits, direction, beta, tau):
  s, t, mask = logits
  loss, metrics = kl(s, t, mask, temperature=tau, direction=direction, beta=beta)
  np.testing.assert_allclose(loss, np_logit_kl(s, t, mask, tau, direction, beta),
                             rtol=RTOL, atol=ATOL)
  assert float(metrics['num_tokens']) == mask.sum()
  pt = np.exp(np_log_softmax(t / tau))
  entropy = -(pt * np.log(pt)).sum(-1)
  np.testing.assert_allclose(metrics['teacher_entropy'],
                             (entropy * mask).sum() / mask.sum(), rtol=RTOL, atol=ATOL)


def test_temperature_squared_factor(logits):
  s, t, mask = logits
  loss, _ = kl(s, t, mask, temperature=3.0)
  unscaled = np.sum(np_kl(np.exp(np_log_softmax(t / 3.0)), np.exp(np_log_softmax(s / 3.0))) *
                    mask) / mask.sum()
  np.testing.assert_allclose(loss, 9.0 * unscaled, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('direction', ['forward', 'reverse', 'jsd'])
@pytest.mark.parametrize('top_k', [3, V])
def test_top_k_renormalisation_matches_numpy(logits, direction, top_k):
  s, t, mask = logits
  loss, _ = kl(s, t, mask, direction=direction, top_k=top_k, temperature=1.5, beta=0.3)
  np.testing.assert_allclose(loss, np_logit_kl(s, t, mask, 1.5, direction, 0.3, top_k),
                             rtol=RTOL, atol=ATOL)


def test_top_k_full_vocab_equals_no_top_k(logits):
  s, t, mask = logits
  np.testing.assert_allclose(kl(s, t, mask, top_k=V)[0], kl(s, t, mask)[0], rtol=RTOL)


@pytest.mark.parametrize('direction', ['forward', 'reverse', 'jsd'])
@pytest.mark.parametrize('top_k', [0, 3])
def test_identical_distributions_give_zero(logits, direction, top_k):
  s, _, mask = logits
  # teacher = student + 5: the same distributions (softmax is shift-invariant)
  loss, _ = kl(s, s + 5.0, mask, direction=direction, top_k=top_k, temperature=2.0)
  assert abs(float(loss)) < ATOL


def test_jsd_limits_are_scaled_kls(logits):
  s, t, mask = logits
  fwd = np_logit_kl(s, t, mask, 1.0, 'forward')
  rev = np_logit_kl(s, t, mask, 1.0, 'reverse')
  eps = 1e-4
  small, _ = kl(s, t, mask, direction='jsd', beta=eps)
  large, _ = kl(s, t, mask, direction='jsd', beta=1 - eps)
  # JSD(β) = β·KL(p_T||p_S)·(1 + O(β)) and (1-β)·KL(p_S||p_T)·(1 + O(1-β)); the O(β)
  # constant grows with p_T/p_S, about 30 for these logits, hence the 5e-3 here.
  np.testing.assert_allclose(float(small) / eps, fwd, rtol=5e-3)
  np.testing.assert_allclose(float(large) / eps, rev, rtol=5e-3)


def test_jsd_symmetry(logits):
  s, t, mask = logits
  a, _ = kl(s, t, mask, direction='jsd', beta=0.5)
  b, _ = kl(t, s, mask, direction='jsd', beta=0.5)
  np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
  c, _ = kl(s, t, mask, direction='jsd', beta=0.2)
  d, _ = kl(t, s, mask, direction='jsd', beta=0.8)  # swapping roles swaps β ↔ 1-β
  np.testing.assert_allclose(c, d, rtol=RTOL, atol=ATOL)
  assert float(a) <= math.log(2) + ATOL  # JSD(0.5) is bounded by log 2 per token


def test_padding_rows_and_columns_do_not_change_kl(logits):
  s, t, mask = logits
  rng = np.random.default_rng(1)
  pad = lambda x, rows, cols: np.concatenate(
      [np.concatenate([x, rng.normal(size=(x.shape[0], cols) + x.shape[2:]).astype(x.dtype)], 1),
       rng.normal(size=(rows, x.shape[1] + cols) + x.shape[2:]).astype(x.dtype)], 0)
  s2, t2 = pad(s, 2, 4), pad(t, 2, 4)
  mask2 = np.zeros((B + 2, T + 4), np.float32)
  mask2[:B, :T] = mask
  for direction in ('forward', 'reverse', 'jsd'):
    np.testing.assert_allclose(kl(s, t, mask, direction=direction)[0],
                               kl(s2, t2, mask2, direction=direction)[0], rtol=RTOL, atol=ATOL)


def test_global_token_mean_not_mean_of_rows(logits):
  s, t, mask = logits
  mask = np.zeros_like(mask)
  mask[0, :] = 1.0  # 7 tokens
  mask[1, 3] = 1.0  # 1 token
  loss, _ = kl(s, t, mask, direction='reverse')
  per_tok = np_token_div(s, t, 1.0, 'reverse')
  np.testing.assert_allclose(loss, (per_tok * mask).sum() / 8.0, rtol=RTOL, atol=ATOL)
  mean_of_rows = 0.5 * (per_tok[0].mean() + per_tok[1, 3])
  assert abs(float(loss) - mean_of_rows) > 1e-3


def test_normalizer_sums_micro_batches(logits):
  s, t, mask = logits
  full, _ = kl(s, t, mask, direction='jsd')
  # Micro-batches as disjoint token masks over the same arrays (row slices would be the same
  # sums; equal shapes reuse the eager compiles).
  parts = [kl(s, t, mask * (np.arange(B) == i)[:, None], direction='jsd',
              normalizer=mask.sum())[0] for i in range(B)]
  np.testing.assert_allclose(sum(parts), full, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('direction', ['forward', 'reverse', 'jsd'])
@pytest.mark.parametrize('top_k', [0, 3])
def test_all_masked_gives_zero_and_finite_grads(logits, direction, top_k):
  s, t, _ = logits
  zero = jnp.zeros((B, T))
  f = lambda s_, t_: logit_kl(s_, t_, zero, direction=direction, top_k=top_k)[0]
  loss = f(jnp.asarray(s), jnp.asarray(t))
  gs, gt = jax.grad(f, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
  assert float(loss) == 0.0
  assert np.all(np.isfinite(gs)) and np.all(gs == 0) and np.all(gt == 0)


@pytest.mark.parametrize('direction', ['forward', 'reverse', 'jsd'])
def test_teacher_gets_no_gradient_student_does(logits, direction):
  s, t, mask = logits
  f = lambda s_, t_: logit_kl(s_, t_, jnp.asarray(mask), direction=direction, top_k=3)[0]
  gs, gt = jax.grad(f, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
  assert np.all(np.asarray(gt) == 0.0)
  assert np.all(np.isfinite(gs)) and np.abs(gs).max() > 1e-4


def test_forward_kl_gradient_is_student_minus_teacher(logits):
  # d/ds Σ p_T (log p_T - log p_S) = (p_S - p_T) per masked token (τ = 1): an independent check
  # of the gradient, not just the value.
  s, t, mask = logits
  g = jax.grad(lambda s_: kl(s_, t, mask)[0])(jnp.asarray(s))
  expect = (np.exp(np_log_softmax(s)) - np.exp(np_log_softmax(t))) * mask[..., None] / mask.sum()
  np.testing.assert_allclose(g, expect, rtol=RTOL, atol=ATOL)


def test_neg_inf_teacher_logits_stay_finite(logits):
  s, t, mask = logits
  t = t.copy()
  t[..., 0] = -np.inf  # a banned token: p_T = 0 there
  loss, _ = kl(s, t, mask)
  g = jax.grad(lambda s_: kl(s_, t, mask)[0])(jnp.asarray(s))
  assert np.isfinite(float(loss)) and np.all(np.isfinite(g))
  np.testing.assert_allclose(loss, np_logit_kl(s, t, mask), rtol=RTOL, atol=ATOL)


def test_logit_kl_under_jit(logits):
  s, t, mask = logits
  f = jax.jit(lambda a, b, m: logit_kl(a, b, m, direction='jsd', beta=0.3, top_k=3,
                                       temperature=2.0)[0])
  np.testing.assert_allclose(f(s, t, mask), np_logit_kl(s, t, mask, 2.0, 'jsd', 0.3, 3),
                             rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('kwargs,match', [
    (dict(direction='kl'), 'direction'),
    (dict(temperature=0.0), 'temperature'),
    (dict(temperature=-1.0), 'temperature'),
    (dict(temperature=float('inf')), 'temperature'),
    (dict(direction='jsd', beta=-0.1), 'beta'),
    (dict(direction='jsd', beta=1.5), 'beta'),
    (dict(direction='jsd', beta=0.0), "'forward' or 'reverse'"),
    (dict(direction='jsd', beta=1.0), "'forward' or 'reverse'"),
    (dict(top_k=-1), 'top_k'),
    (dict(top_k=V + 1), 'top_k'),
    (dict(top_k=2.5), 'top_k'),
])
def test_logit_kl_invalid_arguments(logits, kwargs, match):
  s, t, mask = logits
  with pytest.raises(ValueError, match=match):
    kl(s, t, mask, **kwargs)


def test_logit_kl_invalid_shapes(logits):
  s, t, mask = logits
  with pytest.raises(ValueError, match='share the tokenizer'):
    kl(s, t[..., :-1], mask)
  with pytest.raises(ValueError, match='must have'):
    kl(s, t[:, :-1], mask)
  with pytest.raises(ValueError, match='mask'):
    kl(s, t, mask[:, :-1])
  with pytest.raises(ValueError, match=r'\[B, T, V\]'):
    kl(s[0], t[0], mask)


# ----------------------------------------------------------------- hidden states

def test_uniform_layer_map_examples():
  assert uniform_layer_map(2, 4) == ((1, 2), (2, 4))
  assert uniform_layer_map(3, 4) == ((1, 1), (2, 3), (3, 4))
  assert uniform_layer_map(4, 4) == ((1, 1), (2, 2), (3, 3), (4, 4))
  assert uniform_layer_map(4, 6) == ((1, 2), (2, 3), (3, 5), (4, 6))  # 1.5 → 2, 4.5 → 5
  assert uniform_layer_map(2, 4, include_embeddings=True) == ((0, 0), (1, 2), (2, 4))
  # A student deeper than twice the teacher never maps a block onto the embedding output.
  assert uniform_layer_map(8, 2) == ((1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2), (7, 2),
                                     (8, 2))
  for ls, lt in [(1, 1), (5, 36), (36, 5), (12, 28)]:
    pairs = uniform_layer_map(ls, lt)
    assert len(pairs) == ls and pairs[-1] == (ls, lt)
    assert all(1 <= j <= lt for _, j in pairs)
    assert [j for _, j in pairs] == sorted(j for _, j in pairs)


@pytest.mark.parametrize('args', [(0, 4), (2, 0), (2.0, 4), (-1, 3)])
def test_uniform_layer_map_invalid(args):
  with pytest.raises(ValueError, match='must be an int >= 1'):
    uniform_layer_map(*args)


LS, LT, DS, DT = 2, 4, 5, 6


@pytest.fixture
def hidden():
  rng = np.random.default_rng(2)
  hs = [rng.normal(size=(B, T, DS)).astype(np.float32) for _ in range(LS + 1)]
  ht = [rng.normal(size=(B, T, DT)).astype(np.float32) for _ in range(LT + 1)]
  w = (rng.normal(size=(DS, DT)) / np.sqrt(DS)).astype(np.float32)
  mask = (rng.random((B, T)) < 0.6).astype(np.float32)
  mask[1] = 0.0
  return hs, ht, w, mask


def hid(hs, ht, w, mask, **kw):
  return hidden_state_loss([jnp.asarray(h) for h in hs], [jnp.asarray(h) for h in ht],
                           jnp.asarray(w), jnp.asarray(mask), **kw)


@pytest.mark.parametrize('kind', ['mse', 'cosine'])
@pytest.mark.parametrize('per_layer', [False, True])
def test_hidden_matches_numpy(hidden, kind, per_layer):
  hs, ht, w, mask = hidden
  layer_map = uniform_layer_map(LS, LT, include_embeddings=True)
  if per_layer:
    w = np.stack([w * (p + 1) for p in range(len(layer_map))])
  loss, metrics = hid(hs, ht, w, mask, layer_map=layer_map, kind=kind)
  np.testing.assert_allclose(loss, np_hidden(hs, ht, w, mask, layer_map, kind),
                             rtol=RTOL, atol=ATOL)
  for p, (i, j) in enumerate(layer_map):
    wp = w if w.ndim == 2 else w[p:p + 1]
    np.testing.assert_allclose(metrics[f'pair_s{i}_t{j}'],
                               np_hidden(hs, ht, wp, mask, [(i, j)], kind), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('kind', ['mse', 'cosine'])
def test_hidden_padding_and_global_mean(hidden, kind):
  hs, ht, w, mask = hidden
  lm = uniform_layer_map(LS, LT)
  mask = np.zeros_like(mask)
  mask[0, :] = 1.0
  mask[2, 0] = 1.0
  rng = np.random.default_rng(3)
  pad = lambda h: np.concatenate([h, rng.normal(size=(B, 3, h.shape[-1])).astype(np.float32)], 1)
  mask2 = np.concatenate([mask, np.zeros((B, 3), np.float32)], 1)
  a, _ = hid(hs, ht, w, mask, layer_map=lm, kind=kind)
  b, _ = hid([pad(h) for h in hs], [pad(h) for h in ht], w, mask2, layer_map=lm, kind=kind)
  np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(a, np_hidden(hs, ht, w, mask, lm, kind), rtol=RTOL, atol=ATOL)


def test_hidden_cosine_is_scale_invariant_and_zero_when_aligned(hidden):
  hs, ht, w, mask = hidden
  w_sq = np.eye(DS, DT, dtype=np.float32)
  ht_aligned = [np.concatenate([3.0 * hs[min(j, LS)], np.zeros((B, T, DT - DS), np.float32)], -1)
                for j in range(LT + 1)]
  loss, _ = hid(hs, ht_aligned, w_sq, mask, layer_map=((1, 1), (2, 2)), kind='cosine')
  assert abs(float(loss)) < ATOL


@pytest.mark.parametrize('kind', ['mse', 'cosine'])
def test_hidden_teacher_no_grad_all_masked_zero(hidden, kind):
  hs, ht, w, mask = hidden
  lm = uniform_layer_map(LS, LT)

  def f(hs_, ht_, w_, m_):
    return hidden_state_loss(hs_, ht_, w_, m_, layer_map=lm, kind=kind)[0]

  hs_j, ht_j = [jnp.asarray(h) for h in hs], [jnp.asarray(h) for h in ht]
  gs, gt, gw = jax.grad(f, argnums=(0, 1, 2))(hs_j, ht_j, jnp.asarray(w), jnp.asarray(mask))
  assert all(np.all(np.asarray(g) == 0) for g in gt)
  assert np.abs(gw).max() > 1e-4 and np.abs(gs[2]).max() > 1e-4 and np.all(gs[0] == 0)
  # All masked, and a zero-initialised projection (|W h_S| = 0 in the cosine): 0 and finite.
  zero_w, zero_m = jnp.zeros((DS, DT)), jnp.zeros((B, T))
  assert float(f(hs_j, ht_j, zero_w, zero_m)) == 0.0
  grads = jax.grad(f, argnums=(0, 2))(hs_j, ht_j, zero_w, zero_m)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  gw0 = jax.grad(f, argnums=2)(hs_j, ht_j, zero_w, jnp.asarray(mask))
  assert np.all(np.isfinite(gw0))


def test_hidden_normalizer(hidden):
  hs, ht, w, mask = hidden
  lm = uniform_layer_map(LS, LT)
  full, _ = hid(hs, ht, w, mask, layer_map=lm)
  parts = [hid(hs, ht, w, mask * (np.arange(B) == i)[:, None], layer_map=lm,
               normalizer=mask.sum())[0] for i in range(B)]
  np.testing.assert_allclose(sum(parts), full, rtol=RTOL, atol=ATOL)


def test_hidden_invalid_arguments(hidden):
  hs, ht, w, mask = hidden
  lm = uniform_layer_map(LS, LT)
  with pytest.raises(ValueError, match=r'\(3, 2\).*student in \[0, 2\].*teacher in \[0, 4\]'):
    hid(hs, ht, w, mask, layer_map=((1, 2), (3, 2)))
  with pytest.raises(ValueError, match=r'\(1, 5\)'):
    hid(hs, ht, w, mask, layer_map=((1, 5),))
  with pytest.raises(ValueError, match=r'\(-1, 2\)'):
    hid(hs, ht, w, mask, layer_map=((-1, 2),))
  with pytest.raises(ValueError, match='bad layer_map pair'):
    hid(hs, ht, w, mask, layer_map=((1,),))
  with pytest.raises(ValueError, match='empty'):
    hid(hs, ht, w, mask, layer_map=())
  with pytest.raises(ValueError, match=r'projection has shape \(6, 5\).*\(5, 6\)'):
    hid(hs, ht, w.T, mask, layer_map=lm)
  with pytest.raises(ValueError, match=r'\[M, d_S, d_T\] = \(2, 5, 6\)'):
    hid(hs, ht, np.stack([w] * 3), mask, layer_map=lm)
  with pytest.raises(ValueError, match='kind'):
    hid(hs, ht, w, mask, layer_map=lm, kind='l1')
  with pytest.raises(ValueError, match='share'):
    hid(hs, ht, w, mask[:, :-1], layer_map=lm)
  with pytest.raises(ValueError, match='share'):
    hid(hs, [h[:, :-1] for h in ht], w, mask, layer_map=lm)
  with pytest.raises(ValueError, match='student hidden state 1'):
    hid([hs[0], hs[1][..., :-1], hs[2]], ht, w, mask, layer_map=lm)


# ----------------------------------------------------------------- sequence log-probs and DPO

def test_sequence_log_probs_matches_numpy(logits):
  s, _, mask = logits
  targets = np.random.default_rng(4).integers(0, V, size=(B, T))
  out = sequence_log_probs(jnp.asarray(s), jnp.asarray(targets), jnp.asarray(mask))
  assert out.shape == (B,)
  np.testing.assert_allclose(out, np_seq_logp(s, targets, mask), rtol=RTOL, atol=ATOL)
  assert float(out[2]) == 0.0  # the padding row
  with pytest.raises(ValueError, match='must'):
    sequence_log_probs(jnp.asarray(s), jnp.asarray(targets[:, :-1]), jnp.asarray(mask))


@pytest.fixture
def pairs():
  rng = np.random.default_rng(5)
  pc, pr, rc, rr = (rng.normal(size=6).astype(np.float32) * 5 - 20 for _ in range(4))
  row_mask = np.array([1, 1, 1, 0, 1, 0], np.float32)
  return pc, pr, rc, rr, row_mask


def test_dpo_matches_numpy(pairs):
  pc, pr, rc, rr, rm = pairs
  loss, metrics = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=0.1,
                           row_mask_b=jnp.asarray(rm))
  ref, z = np_dpo(pc, pr, rc, rr, 0.1, rm)
  np.testing.assert_allclose(loss, ref, rtol=RTOL, atol=ATOL)
  real = rm > 0
  np.testing.assert_allclose(metrics['reward_margin'], z[real].mean(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics['reward_accuracy'], (z[real] > 0).mean(), rtol=RTOL)
  np.testing.assert_allclose(metrics['reward_chosen'], (0.1 * (pc - rc))[real].mean(),
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics['reward_rejected'], (0.1 * (pr - rr))[real].mean(),
                             rtol=RTOL, atol=ATOL)
  assert float(metrics['num_pairs']) == 4.0
  full, _ = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=0.1)
  np.testing.assert_allclose(full, np_dpo(pc, pr, rc, rr, 0.1, np.ones(6))[0], rtol=RTOL)


def test_dpo_is_stable_for_large_margins():
  big = jnp.array([1e4, -1e4] * 3)
  zero = jnp.zeros(6)
  loss, _ = dpo_loss(big, zero, zero, zero, beta=1.0)
  np.testing.assert_allclose(loss, 0.5 * 1e4, rtol=RTOL)  # -log σ(-1e4) = 1e4, -log σ(1e4) = 0
  g = jax.grad(lambda x: dpo_loss(x, zero, zero, zero, beta=1.0)[0])(big)
  assert np.all(np.isfinite(g))


def test_dpo_gradient_signs_and_frozen_reference(pairs):
  pc, pr, rc, rr, rm = map(jnp.asarray, pairs)
  f = lambda *a: dpo_loss(*a, beta=0.5, row_mask_b=rm)[0]
  gpc, gpr, grc, grr = jax.grad(f, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
  real = np.asarray(rm) > 0
  assert np.all(np.asarray(gpc)[real] < 0)  # raising log π(y⁺) lowers the loss
  assert np.all(np.asarray(gpr)[real] > 0)  # raising log π(y⁻) raises it
  assert np.all(np.asarray(gpc)[~real] == 0) and np.all(np.asarray(gpr)[~real] == 0)
  assert np.all(np.asarray(grc) == 0) and np.all(np.asarray(grr) == 0)
  # and one finite-size step confirms it
  assert float(f(pc + 0.1 * rm, pr, rc, rr)) < float(f(pc, pr, rc, rr))


def test_dpo_all_masked_and_padding_garbage(pairs):
  pc, pr, rc, rr, _ = map(jnp.asarray, pairs)
  zero = jnp.zeros(6)
  f = lambda x: dpo_loss(x, pr, rc, rr, beta=0.1, row_mask_b=zero)[0]
  assert float(f(pc)) == 0.0 and np.all(np.isfinite(jax.grad(f)(pc)))
  # a padding row holding inf changes nothing
  rm = jnp.array([1, 1, 1, 0, 1, 0], jnp.float32)
  a, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, row_mask_b=rm)
  g = jax.grad(lambda x: dpo_loss(x, pr, rc, rr, beta=0.1, row_mask_b=rm)[0])(
      pc.at[3].set(jnp.inf))
  b, _ = dpo_loss(pc.at[3].set(jnp.inf), pr, rc, rr, beta=0.1, row_mask_b=rm)
  np.testing.assert_allclose(a, b, rtol=RTOL)
  assert np.all(np.isfinite(g))


def test_dpo_invalid_arguments(pairs):
  pc, pr, rc, rr, rm = map(jnp.asarray, pairs)
  for beta in (0.0, -0.1):
    with pytest.raises(ValueError, match='beta'):
      dpo_loss(pc, pr, rc, rr, beta=beta)
  with pytest.raises(ValueError, match=r'ref_rejected \(5,\)'):
    dpo_loss(pc, pr, rc, rr[:5], beta=0.1)
  with pytest.raises(ValueError, match=r'row_mask \(5,\)'):
    dpo_loss(pc, pr, rc, rr, beta=0.1, row_mask_b=rm[:5])
  with pytest.raises(ValueError, match=r'\[B\]'):
    dpo_loss(pc[None], pr[None], rc[None], rr[None], beta=0.1)


# ----------------------------------------------------------------- preference level (DPD)

@pytest.fixture
def dpd():
  rng = np.random.default_rng(6)
  t2 = T  # y⁻ could have its own length; the same one reuses eager compiles (test run time)
  arrays = dict(
      student_chosen_logits_btv=rng.normal(size=(B, T, V)).astype(np.float32) * 2,
      teacher_chosen_logits_btv=rng.normal(size=(B, T, V)).astype(np.float32) * 2,
      chosen_targets_bt=rng.integers(0, V, size=(B, T)),
      chosen_mask_bt=(rng.random((B, T)) < 0.7).astype(np.float32),
      student_rejected_logits_btv=rng.normal(size=(B, t2, V)).astype(np.float32) * 2,
      teacher_rejected_logits_btv=rng.normal(size=(B, t2, V)).astype(np.float32) * 2,
      rejected_targets_bt=rng.integers(0, V, size=(B, t2)),
      rejected_mask_bt=(rng.random((B, t2)) < 0.5).astype(np.float32),
      ref_chosen_logp_b=rng.normal(size=B).astype(np.float32) - 15,
      ref_rejected_logp_b=rng.normal(size=B).astype(np.float32) - 15)
  return arrays, np.array([1, 1, 0], np.float32)


def np_dpd(a, row_mask, beta, tau, kl_weight, dpo_weight, direction='forward'):
  mc = a['chosen_mask_bt'] * row_mask[:, None]
  mr = a['rejected_mask_bt'] * row_mask[:, None]
  dc = np_token_div(a['student_chosen_logits_btv'], a['teacher_chosen_logits_btv'], tau,
                    direction)
  dr = np_token_div(a['student_rejected_logits_btv'], a['teacher_rejected_logits_btv'], tau,
                    direction)
  kl_ = ((dc * mc).sum() + (dr * mr).sum()) / max(mc.sum() + mr.sum(), 1.0)
  pc = np_seq_logp(a['student_chosen_logits_btv'], a['chosen_targets_bt'], mc)
  pr = np_seq_logp(a['student_rejected_logits_btv'], a['rejected_targets_bt'], mr)
  dpo_, _ = np_dpo(pc, pr, a['ref_chosen_logp_b'], a['ref_rejected_logp_b'], beta, row_mask)
  return kl_weight * kl_ + dpo_weight * dpo_, kl_, dpo_


def jx(a):
  return {k: jnp.asarray(v) for k, v in a.items()}


@pytest.mark.parametrize('kl_weight,dpo_weight', [(1.0, 1.0), (0.3, 2.0), (0.0, 1.0), (1.0, 0.0)])
def test_preference_distillation_matches_numpy(dpd, kl_weight, dpo_weight):
  a, rm = dpd
  loss, metrics = preference_distillation_loss(
      **jx(a), beta=0.1, temperature=2.0, kl_weight=kl_weight, dpo_weight=dpo_weight,
      direction='reverse', row_mask_b=jnp.asarray(rm))
  total, kl_, dpo_ = np_dpd(a, rm, 0.1, 2.0, kl_weight, dpo_weight, 'reverse')
  np.testing.assert_allclose(loss, total, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics['kl'], kl_, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics['dpo'], dpo_, rtol=RTOL, atol=ATOL)
  mc = a['chosen_mask_bt'] * rm[:, None]
  dc = np_token_div(a['student_chosen_logits_btv'], a['teacher_chosen_logits_btv'], 2.0, 'reverse')
  np.testing.assert_allclose(metrics['kl_chosen'], (dc * mc).sum() / mc.sum(), rtol=RTOL,
                             atol=ATOL)
  assert float(metrics['num_tokens_chosen']) == mc.sum()
  for key in ('kl_rejected', 'teacher_entropy', 'dpo_reward_margin', 'dpo_reward_accuracy',
              'dpo_num_pairs'):
    assert key in metrics


def test_preference_distillation_gradients(dpd):
  a, rm = dpd
  a = jx(a)

  def f(student_c, teacher_c, student_r, teacher_r, ref_c, ref_r, mask_scale=1.0):
    args = dict(a, student_chosen_logits_btv=student_c, teacher_chosen_logits_btv=teacher_c,
                student_rejected_logits_btv=student_r, teacher_rejected_logits_btv=teacher_r,
                ref_chosen_logp_b=ref_c, ref_rejected_logp_b=ref_r,
                chosen_mask_bt=a['chosen_mask_bt'] * mask_scale,
                rejected_mask_bt=a['rejected_mask_bt'] * mask_scale)
    return preference_distillation_loss(**args, beta=0.1,
                                        row_mask_b=jnp.asarray(rm) * mask_scale)[0]

  inputs = (a['student_chosen_logits_btv'], a['teacher_chosen_logits_btv'],
            a['student_rejected_logits_btv'], a['teacher_rejected_logits_btv'],
            a['ref_chosen_logp_b'], a['ref_rejected_logp_b'])
  g = jax.grad(f, argnums=tuple(range(6)))(*inputs)
  for k in (1, 3, 4, 5):  # teacher logits and the reference: frozen
    assert np.all(np.asarray(g[k]) == 0)
  assert np.abs(g[0]).max() > 1e-4 and np.abs(g[2]).max() > 1e-4
  assert np.all(np.asarray(g[0])[2] == 0)  # the padding row (row_mask 0)
  # all masked (no real pair, no response token): 0 and finite gradients
  assert float(f(*inputs, mask_scale=0.0)) == 0.0
  g0 = jax.grad(lambda *x: f(*x, mask_scale=0.0), argnums=(0, 2))(*inputs)
  assert all(np.all(np.isfinite(x)) for x in g0)


def test_preference_distillation_invalid_arguments(dpd):
  a, rm = dpd
  with pytest.raises(ValueError, match='kl_weight'):
    preference_distillation_loss(**jx(a), beta=0.1, kl_weight=-1.0)
  with pytest.raises(ValueError, match='beta'):
    preference_distillation_loss(**jx(a), beta=0.0)
  with pytest.raises(ValueError, match='direction'):
    preference_distillation_loss(**jx(a), beta=0.1, direction='both')
  with pytest.raises(ValueError, match='row_mask'):
    preference_distillation_loss(**jx(a), beta=0.1, row_mask_b=jnp.ones(B + 1))
  bad = dict(a, teacher_rejected_logits_btv=a['teacher_rejected_logits_btv'][..., :-1])
  with pytest.raises(ValueError, match='share the tokenizer'):
    preference_distillation_loss(**jx(bad), beta=0.1)
  bad = dict(a, student_rejected_logits_btv=a['student_rejected_logits_btv'][:-1])
  with pytest.raises(ValueError, match='same number of rows'):
    preference_distillation_loss(**jx(bad), beta=0.1)
