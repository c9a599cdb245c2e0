"""Model invariants: packing isolates documents, cached decoding equals a full
forward pass, hidden states, bf16 and config validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.llama import KVCache, ModelConfig, Transformer

CFG = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)


@pytest.fixture(scope='module', params=['gqa_tied', 'bias_qknorm_untied'])
def model(request):
  cfg = CFG
  if request.param == 'bias_qknorm_untied':
    cfg = ModelConfig(**{**CFG.__dict__, 'qkv_bias': True, 'qk_norm': True,
                         'tie_embeddings': False, 'num_kv_heads': 1})
  return Transformer(cfg, nnx.Rngs(0))


@functools.partial(nnx.jit, static_argnames='return_hidden')
def call(model, tokens_bt, positions_bt, segment_ids_bt=None, cache=None, return_hidden=False):
  """The forward pass under jit: one compile per shape beats eager op dispatch."""
  return model(tokens_bt, positions_bt, segment_ids_bt, cache=cache, return_hidden=return_hidden)


def tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 1, CFG.vocab_size)


def test_param_count_matches_config(model):
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == model.cfg.num_params()


def test_packed_documents_do_not_attend_to_each_other(model):
  tok = tokens((1, 10))
  seg = jnp.array([[1] * 4 + [2] * 5 + [0]])
  pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]])
  packed = call(model, tok, pos, seg).logits
  first = call(model, tok[:, :4], jnp.arange(4)[None]).logits
  second = call(model, tok[:, 4:9], jnp.arange(5)[None]).logits
  np.testing.assert_allclose(packed[0, :4], first[0], atol=1e-5)
  np.testing.assert_allclose(packed[0, 4:9], second[0], atol=1e-5)


def test_kv_cache_decode_matches_full_forward(model):
  tok = tokens((2, 9))
  # Row 0 is left-padded by 2; row 1 is a full-length prompt.
  prompt = tok[:, :6]
  seg = jnp.array([[0, 0, 1, 1, 1, 1], [1] * 6])
  pos = jnp.array([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
  out = call(model, prompt, pos, seg, cache=KVCache.init(model.cfg, 2, 12))
  full0 = call(model, tok[:1, 2:9], jnp.arange(7)[None]).logits[0]
  full1 = call(model, tok[1:, :9], jnp.arange(9)[None]).logits[0]
  np.testing.assert_allclose(out.logits[0, 2:], full0[:4], atol=1e-5)
  np.testing.assert_allclose(out.logits[1], full1[:6], atol=1e-5)
  cache, next_pos = out.cache, jnp.array([4, 6])
  for step in range(3):
    out = call(model, tok[:, 6 + step:7 + step], next_pos[:, None] + step, cache=cache)
    cache = out.cache
    np.testing.assert_allclose(out.logits[0, 0], full0[4 + step], atol=1e-5)
    np.testing.assert_allclose(out.logits[1, 0], full1[6 + step], atol=1e-5)


def test_hidden_states(model):
  out = call(model, tokens((2, 5)), jnp.broadcast_to(jnp.arange(5), (2, 5)), return_hidden=True)
  assert len(out.hidden) == model.cfg.num_layers + 1
  assert all(h.shape == (2, 5, model.cfg.d_model) for h in out.hidden)


def test_bfloat16_compute_is_close_to_float32():
  f32 = Transformer(CFG, nnx.Rngs(0))
  bf16 = Transformer(ModelConfig(**{**CFG.__dict__, 'dtype': 'bfloat16'}), nnx.Rngs(0))
  tok, pos = tokens((2, 8)), jnp.broadcast_to(jnp.arange(8), (2, 8))
  a, b = call(f32, tok, pos).logits, call(bf16, tok, pos).logits
  assert b.dtype == jnp.float32  # logits always float32
  assert float(jnp.max(jnp.abs(a - b))) < 0.1 * float(jnp.max(jnp.abs(a)))


@pytest.mark.parametrize('kwargs, match', [
    ({'num_kv_heads': 3}, 'multiple of num_kv_heads'),
    ({'head_dim': 7}, 'even'),
    ({'dtype': 'float16'}, 'dtype'),
])
def test_invalid_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{**CFG.__dict__, **kwargs})
