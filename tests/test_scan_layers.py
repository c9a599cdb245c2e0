"""scan_layers: the scanned model is the unrolled one with its blocks stacked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from models.llama import KVCache, ModelConfig, Transformer
from pipeline import sharding
from pipeline import state as state_lib

CFG = dict(vocab_size=61, d_model=16, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4,
           mlp_dim=32, qk_norm=True)


def _params(cfg: ModelConfig):
  return nnx.split(Transformer(cfg, nnx.Rngs(0)))[1].to_pure_dict()


def _stack(unrolled: dict) -> dict:
  """The unrolled tree with blocks {0: tree, 1: tree, ...} stacked to [L, ...]."""
  blocks = [unrolled['blocks'][i] for i in sorted(unrolled['blocks'])]
  return {**unrolled, 'blocks': jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def _model(cfg: ModelConfig, params):
  graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[0]
  return nnx.merge(graphdef, params)


def test_scanned_init_is_the_stacked_unrolled_init():
  plain = _params(ModelConfig(**CFG))
  scanned = _params(ModelConfig(**CFG, scan_layers=True))
  jax.tree.map(np.testing.assert_array_equal, scanned, _stack(plain))


@pytest.mark.parametrize('remat', [False, True])
def test_scanned_logits_hidden_and_grads_match_unrolled(remat):
  plain_cfg = ModelConfig(**CFG, remat=remat)
  scan_cfg = ModelConfig(**CFG, remat=remat, remat_policy='dots', scan_layers=True)
  params = _params(plain_cfg)
  # Different weights per layer, so a wrong layer order would show.
  params = jax.tree.map(lambda x: x + 0.01 * jnp.arange(x.size).reshape(x.shape) / x.size, params)
  tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, CFG['vocab_size'])
  positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])

  def loss(p, cfg):
    out = _model(cfg, p)(tokens, positions, segments, return_hidden=True)
    return jnp.mean(out.logits ** 2), out

  (l1, o1), g1 = jax.value_and_grad(loss, has_aux=True)(params, plain_cfg)
  (l2, o2), g2 = jax.value_and_grad(loss, has_aux=True)(_stack(params), scan_cfg)
  np.testing.assert_allclose(o2.logits, o1.logits, atol=1e-5, rtol=1e-5)
  assert len(o2.hidden) == len(o1.hidden) == CFG['num_layers'] + 1
  for h2, h1 in zip(o2.hidden, o1.hidden):
    np.testing.assert_allclose(h2, h1, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               g2, _stack(g1))


def test_scanned_kv_cache_decode_matches_unrolled():
  plain_cfg, scan_cfg = ModelConfig(**CFG), ModelConfig(**CFG, scan_layers=True)
  params = _params(plain_cfg)
  tokens = jax.random.randint(jax.random.key(2), (2, 5), 0, CFG['vocab_size'])
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  outs = []
  for cfg, p in ((plain_cfg, params), (scan_cfg, _stack(params))):
    model = _model(cfg, p)
    cache = KVCache.init(cfg, 2, 8)
    prefill = model(tokens[:, :4], positions[:, :4], cache=cache)
    step = model(tokens[:, 4:], positions[:, 4:], cache=prefill.cache)
    outs.append((prefill.logits, step.logits, step.cache.k))
  for a, b in zip(*outs):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_scanned_params_shard_on_the_mesh():
  """'layers' is replicated; the other axes follow the rules as unrolled."""
  mesh = sharding.make_mesh((1, 2, 2), jax.devices()[:4])
  rules = (('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'))
  spec = state_lib.model_spec(ModelConfig(**CFG, scan_layers=True), mesh, rules)
  assert spec.axes['blocks']['mlp']['w_gate_df'] == ('layers', 'embed', 'mlp')
  assert spec.param_shardings['blocks']['mlp']['w_gate_df'].spec == P(None, 'fsdp', 'tensor')


def test_bad_remat_policy_is_an_error():
  with pytest.raises(ValueError, match='remat_policy'):
    ModelConfig(**CFG, remat_policy='everything')
