"""The cached sampler against a naive full-forward decode, stopping, filtering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.llama import ModelConfig
from pipeline import sampling, sharding
from pipeline import state as state_lib

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)
PAD = 0


@pytest.fixture(scope='module')
def model():
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  spec = state_lib.model_spec(CFG, mesh, ())
  return spec, state_lib.init_params(spec, seed=3)


def naive_greedy(spec, params, prompt, n):
  """Re-runs the whole sequence for every new token: no cache, no padding."""
  forward = jax.jit(lambda p, t: state_lib.merge(spec, p)(t, jnp.arange(t.shape[1])[None]).logits)
  ids, logps = list(prompt), []
  for _ in range(n):
    logits = forward(params, jnp.array([ids]))[0, -1]
    token = int(jnp.argmax(logits))
    logps.append(float(jax.nn.log_softmax(logits)[token]))
    ids.append(token)
  return ids[len(prompt):], logps


def test_greedy_matches_naive_decode(model):
  spec, params = model
  prompts = [np.array([5, 9, 13]), np.array([7, 1, 2, 3, 4, 30, 31]), np.array([11])]
  out = sampling.generate(spec, params, prompts, sampling.SamplingConfig(max_new_tokens=6),
                          rng=jax.random.key(0), end_id=63, pad_id=PAD, batch_size=2)
  for i, prompt in enumerate(prompts):
    tokens, logps = naive_greedy(spec, params, prompt, 6)
    n = int(out.lengths[i])
    assert out.tokens[i, :n].tolist() == tokens[:n]
    np.testing.assert_allclose(out.log_probs[i, :n], logps[:n], atol=1e-4)


def test_stops_at_end_token_and_flags_truncation(model):
  spec, params = model
  prompts = [np.array([5, 9, 13]), np.array([8, 8])]
  first, _ = naive_greedy(spec, params, prompts[0], 6)
  end_id = first[2]  # make row 0's third generated token the end of turn
  out = sampling.generate(spec, params, prompts, sampling.SamplingConfig(max_new_tokens=6),
                          rng=jax.random.key(0), end_id=end_id, pad_id=PAD)
  assert out.lengths[0] == first.index(end_id) + 1
  assert not out.truncated[0]
  assert np.all(out.tokens[0, out.lengths[0]:] == PAD)
  assert np.all(out.log_probs[0, out.lengths[0]:] == 0.0)
  second, _ = naive_greedy(spec, params, prompts[1], 6)
  assert out.truncated[1] == (end_id not in second)


def test_temperature_sampling_is_reproducible_and_varies(model):
  spec, params = model
  prompts = [np.array([5, 9, 13])] * 8
  cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.5)
  a = sampling.generate(spec, params, prompts, cfg, rng=jax.random.key(1), end_id=63, pad_id=PAD)
  b = sampling.generate(spec, params, prompts, cfg, rng=jax.random.key(1), end_id=63, pad_id=PAD)
  assert np.array_equal(a.tokens, b.tokens)
  assert len({tuple(r) for r in a.tokens.tolist()}) > 1


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1], [0.1, 0.2, 0.3, 0.4]]))
  k2 = np.asarray(sampling.filter_logits(logits, 2, 1.0))
  assert np.isfinite(k2).sum(1).tolist() == [2, 2]
  assert np.isfinite(k2[0, :2]).all() and np.isfinite(k2[1, 2:]).all()
  p = np.asarray(sampling.filter_logits(logits, 0, 0.7))
  # Row 0: 0.5 + 0.25 reaches 0.7 -> keep 2; row 1: 0.4 + 0.3 reaches 0.7 -> keep 2.
  assert np.isfinite(p).sum(1).tolist() == [2, 2]
  p_small = np.asarray(sampling.filter_logits(logits, 0, 0.01))
  assert np.isfinite(p_small).sum(1).tolist() == [1, 1]  # never empty


def test_prompt_lengths_share_a_compiled_bucket(model):
  spec, params = model
  cfg = sampling.SamplingConfig(max_new_tokens=4)
  before = sampling._generate._cache_size()
  for n in (3, 5, 9, 14):  # all inside the 16-token bucket
    sampling.generate(spec, params, [np.arange(1, n + 1)] * 2, cfg, rng=jax.random.key(0),
                      end_id=63, pad_id=PAD)
  assert sampling._generate._cache_size() - before <= 1
