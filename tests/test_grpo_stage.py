"""GRPO stage wiring: the update step is sharding-invariant and starts at
ratio 1, prompt order resumes exactly, batches mask filler groups."""

import dataclasses
import functools
import json

import jax
import numpy as np
import optax
import pytest

from configs import common
from models.llama import ModelConfig
from pipeline import grpo, sampling, sharding, sft
from pipeline import state as state_lib
from pipeline.optim import make_optimizer

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)
GCFG = grpo.GRPOConfig(group_size=4, num_iterations=2, epsilon_low=0.2, epsilon_high=0.28,
                       beta=0.0, scale_rewards='group', negative_weight=1.0,
                       loss_agg='token_mean', temperature=1.0, max_new_tokens=8, sft_coef=0.0)


def rollout_batch(seed, rows=8, length=16):
  rng = np.random.default_rng(seed)
  prompt_len = 6
  items = [sampling.prompt_completion_row(rng.integers(1, 64, prompt_len),
                                          rng.integers(1, 64, rng.integers(2, 9)), length)
           for _ in range(rows)]
  batch = {k: np.stack([r[k] for r in items]) for k in items[0]}
  batch['advantages'] = rng.normal(size=rows).astype(np.float32)
  batch['truncated'] = np.array([False] * (rows - 1) + [True])
  return batch


def run_updates(mesh_shape, devices):
  mesh = sharding.make_mesh(mesh_shape, devices)
  with jax.set_mesh(mesh):
    spec = state_lib.model_spec(CFG, mesh, common.DEFAULT_RULES)
    tx, schedule = make_optimizer(common.optim(lr=1e-2, warmup_steps=0), 10)
    state, shardings = state_lib.init_train_state(spec, state_lib.init_params(spec, 0), tx,
                                                  mesh, seed=0)
    bs = sharding.batch_sharding(mesh, common.DEFAULT_RULES)
    step = jax.jit(functools.partial(grpo.train_step, spec=spec, tx=tx, schedule=schedule,
                                     cfg=GCFG),
                   in_shardings=(shardings, bs), out_shardings=(shardings, None),
                   donate_argnums=0)
    logp = jax.jit(lambda p, b: grpo.policy_log_probs(p, b, spec, 1.0)[0])
    batch = sharding.shard_batch(rollout_batch(0), bs)
    batch['old_logp'] = logp(state['params'], batch)
    history = []
    for _ in range(GCFG.num_iterations):  # μ updates against the same old log-probs
      state, metrics = step(state, batch)
      history.append(jax.device_get(metrics))
    return history, jax.device_get(state['params'])


def test_first_update_is_on_policy_and_sharding_invariant():
  single, single_params = run_updates((1, 1, 1), jax.devices()[:1])
  sharded, sharded_params = run_updates((2, 2, 2), jax.devices())
  assert single[0]['ratio_mean'] == 1.0 or abs(single[0]['ratio_mean'] - 1.0) < 1e-6
  assert single[0]['clip_frac'] == 0.0
  assert single[1]['approx_kl_old'] > 0.0  # μ = 2: the second update is off-policy
  for a, b in zip(single, sharded):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-4, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               single_params, sharded_params)


def test_sft_anchor_adds_the_reference_cross_entropy():
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with jax.set_mesh(mesh):
    spec = state_lib.model_spec(CFG, mesh, common.DEFAULT_RULES)
    tx, schedule = make_optimizer(common.optim(lr=1e-2, warmup_steps=0), 10)
    params = state_lib.init_params(spec, 0)
    batch = rollout_batch(0)
    batch['old_logp'] = grpo.policy_log_probs(params, batch, spec, 1.0)[0]
    rng = np.random.default_rng(1)
    batch['sft'] = {'inputs': rng.integers(1, 64, (4, 16)), 'targets': rng.integers(1, 64, (4, 16)),
                    'positions': np.tile(np.arange(16), (4, 1)),
                    'segment_ids': np.ones((4, 16), np.int32),
                    'loss_mask': (rng.random((4, 16)) < 0.5).astype(np.float32)}
    losses = {}
    for coef in (0.0, 0.5):
      state, _ = state_lib.init_train_state(spec, params, tx, mesh, seed=0)
      cfg = dataclasses.replace(GCFG, sft_coef=coef)
      step = jax.jit(functools.partial(grpo.train_step, spec=spec, tx=tx, schedule=schedule,
                                       cfg=cfg))
      _, metrics = step(state, batch)
      losses[coef] = metrics
    ce_sum, sums = sft.loss_and_metrics(params, batch['sft'], spec)
    ce = float(ce_sum / sums['num_tokens'])
    ce_grads = jax.jit(jax.grad(lambda p: sft.loss_and_metrics(p, batch['sft'], spec)[0] /
                                sums['num_tokens']))(params)
  np.testing.assert_allclose(losses[0.5]['sft_loss'], ce, rtol=1e-5)
  np.testing.assert_allclose(losses[0.5]['loss'], losses[0.0]['loss'] + 0.5 * ce, rtol=1e-5)
  assert 'sft_loss' not in losses[0.0] and 'grad_cosine' not in losses[0.0]
  # Each term's gradient, and the update's (their sum): |a + b|² = a² + b² + 2ab·cos.
  m = losses[0.5]
  np.testing.assert_allclose(m['policy_grad_norm'], losses[0.0]['grad_norm'], rtol=1e-5)
  np.testing.assert_allclose(m['sft_grad_norm'], 0.5 * float(optax.tree.norm(ce_grads)),
                             rtol=1e-5)
  a, b, cos = m['policy_grad_norm'], m['sft_grad_norm'], m['grad_cosine']
  assert -1.0 <= cos <= 1.0
  np.testing.assert_allclose(m['grad_norm'] ** 2, a ** 2 + b ** 2 + 2 * a * b * cos, rtol=1e-4)


def test_prompt_iterator_resumes_exactly():
  records = [{'id': str(i)} for i in range(7)]
  it = grpo.PromptIterator(records, 3, seed=5)
  for _ in range(4):  # crosses epoch boundaries
    next(it)
  state = it.get_state()
  expected = [r['id'] for r in next(it) + it.take(2)]
  fresh = grpo.PromptIterator(records, 3, seed=5)
  fresh.set_state(state)
  assert [r['id'] for r in next(fresh) + fresh.take(2)] == expected
  first_epoch = grpo.PromptIterator(records, 7, seed=5)
  assert sorted(r['id'] for r in next(first_epoch)) == sorted(r['id'] for r in records)


def test_build_batch_masks_filler_groups():
  samples = sampling.Samples(tokens=np.array([[5, 6, 2], [7, 2, 0], [8, 8, 8], [9, 2, 0]]),
                             log_probs=np.zeros((4, 3), np.float32),
                             lengths=np.array([3, 2, 3, 2]),
                             truncated=np.array([False, False, True, False]))
  rollout = grpo.Rollout(records=[{}] * 4, prompt_ids=[np.array([1, 3])] * 4, samples=samples,
                         rewards=np.array([1.0, 0.0, 1.0, 1.0]), per_function={}, stats={})
  batch = grpo.build_batch([rollout], [(0, 0)], [np.array([0.7, -0.7])], num_groups=2,
                           group_size=2, seq_len=8)
  assert batch['inputs'].shape == (4, 8)
  assert batch['mask'][:2].sum() == 3 + 2  # the completion tokens of the kept group
  assert batch['mask'][2:].sum() == 0.0  # filler rows count for nothing
  np.testing.assert_allclose(batch['advantages'], [0.7, -0.7, 0.0, 0.0])
  assert batch['inputs'][0, :5].tolist() == [1, 3, 5, 6, 0]
  assert batch['targets'][0, :4].tolist() == [3, 5, 6, 2]


def test_groups_are_judged_by_the_verifier_not_the_shaped_total():
  # Three groups of 2: right/wrong; both right, lengths differ (only the
  # overlong term varies); both right with equal totals.
  samples = sampling.Samples(tokens=np.zeros((6, 1), np.int32),
                             log_probs=np.zeros((6, 1), np.float32),
                             lengths=np.ones(6, np.int64), truncated=np.zeros(6, bool))
  per_function = {'stem': np.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]),
                  'overlong': np.array([0.0, 0.0, 0.0, -0.5, 0.0, 0.0])}
  rollout = grpo.Rollout(records=[{}] * 6, prompt_ids=[np.array([1])] * 6, samples=samples,
                         rewards=np.array([1.0, 0.0, 1.0, 0.95, 1.0, 1.0]),
                         per_function=per_function, stats={})
  assert grpo.uninformative_groups(rollout, ('stem', 'code'), 2).tolist() == [False, True, True]
  assert grpo.solved(rollout, ('stem',)).tolist() == [True, False, True, True, True, True]
  # No verifier (a preference stage): the total reward decides.
  assert grpo.uninformative_groups(rollout, ('code',), 2).tolist() == [False, False, True]
  assert not grpo.solved(rollout, ('code',)).any()


def test_greedy_in_group_puts_the_greedy_completion_first(tmp_path):
  """grpo.greedy_in_group: each group's first row is the greedy completion (the
  one the held-out suite scores), the other G - 1 are sampled at T; the
  pass-rate filter keeps pure samples."""
  from data.tokenizer import train_tokenizer
  tok = train_tokenizer(['Calculate 12 + 30.', 'What is 7 times 6?', 'The answer is 42.'] * 20,
                        300, str(tmp_path))
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=64)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  spec = state_lib.model_spec(cfg, mesh, ())
  params = state_lib.init_params(spec, seed=1)
  unscored = lambda prompts, completions, **columns: (np.zeros(len(completions)), {}, {})
  gcfg = dataclasses.replace(GCFG, greedy_in_group=True, temperature=1.5, max_new_tokens=6)
  roller = grpo.Roller(spec, tok, unscored, gcfg, top_k=0, top_p=1.0)
  records = [{'task': 'math', 'messages': [{'role': 'user', 'content': text}]}
             for text in ('Calculate 12 + 30.', 'What is 7 times 6?')]
  rollout = roller(params, records, jax.random.key(0), group_size=4)
  greedy = sampling.generate(spec, params, rollout.prompt_ids[::4],
                             sampling.SamplingConfig(max_new_tokens=6), rng=jax.random.key(0),
                             end_id=tok.end_id, pad_id=tok.pad_id)
  np.testing.assert_array_equal(rollout.samples.tokens[::4], greedy.tokens)
  np.testing.assert_array_equal(rollout.samples.lengths[::4], greedy.lengths)
  sampled = np.delete(rollout.samples.tokens, np.s_[::4], axis=0)
  assert (sampled != np.repeat(greedy.tokens, 3, axis=0)).any(axis=1).all()  # T = 1.5
  pure = roller(params, records, jax.random.key(0), group_size=4, with_greedy=False)
  assert (pure.samples.tokens != np.repeat(greedy.tokens, 4, axis=0)).any(axis=1).all()


def test_filter_file_restores_the_kept_order(tmp_path):
  """A resumed stage reads filter.json: its prompts must come back in the
  order the filter kept them (the prompt iterator permutes that list), not
  in the candidates' order, or the resumed run trains on other prompts."""
  candidates = [{'id': f'p{i}'} for i in range(6)]
  path = tmp_path / 'filter.json'
  path.write_text(json.dumps({'kept': ['p4', 'p0', 'p3'], 'stats': {'kept': 3}}))
  prompts, stats = grpo.load_filter(str(path), candidates)
  assert [p['id'] for p in prompts] == ['p4', 'p0', 'p3'] and stats == {'kept': 3}
  path.write_text(json.dumps({'kept': ['p4', 'gone'], 'stats': {}}))
  with pytest.raises(ValueError, match="filter.json keeps 1 prompts .*'gone'"):
    grpo.load_filter(str(path), candidates)
