"""The reward-model stage: pairs derived from real records (chitchat ratings,
reasoning-gym answers), the head's read position, a sharded step equals a
single-device step, a short run learns held-out verifiable pairs, and
load_scorer reproduces the in-training rewards."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import common
from data.sources import reasoning_gym_math
from data.tokenizer import train_tokenizer
from models.llama import ModelConfig
from pipeline import checkpoint, loop, sharding, stage_data
from pipeline import reward_model as rm
from pipeline import state as state_lib
from pipeline.optim import make_optimizer

RULES = common.DEFAULT_RULES
PAIRS = ConfigDict(dict(min_rating_gap=3.0, per_record=1))
SEED = 0


def data_config(chat_train: int, chat_eval: int) -> ConfigDict:
  sources = {
      'math': common.source('reasoning_gym', weight=1.0, train_size=400, eval_size=100,
                            task_names=('chain_sum',), eval_guard_size=100),
      'chat': common.source('chat', weight=1.0, train_size=chat_train, eval_size=chat_eval,
                            sources=('chitchat',)),
  }
  return ConfigDict(dict(sources=ConfigDict(sources), curriculum=()))


@pytest.fixture(scope='module')
def data():
  return stage_data.load(data_config(600, 200), seed=SEED)


@pytest.fixture(scope='module')
def tokenizer(data, tmp_path_factory):
  texts = [m['content'] for r in data.all_train() for m in r['messages']]
  return train_tokenizer(texts, 512, str(tmp_path_factory.mktemp('tok')))


@pytest.fixture(scope='module')
def model_config(tokenizer):
  # One layer: XLA:CPU compiles of the train step dominate this file's time,
  # and one layer already learns the verifiable pairs.
  return ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, num_layers=1, num_heads=4,
                     num_kv_heads=2, head_dim=8, mlp_dim=64)


def random_params(spec, seed):
  """Backbone params from numpy (state_lib.init_params compiles for seconds)."""
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    if str(getattr(path[-1], 'key', path[-1])) == 'scale':  # RMSNorm gains
      return np.ones(leaf.shape, np.float32)
    return (rng.normal(size=leaf.shape) * 0.15).astype(np.float32)

  tree = jax.tree_util.tree_map_with_path(make, state_lib.abstract_params(spec))
  return jax.device_put(tree, spec.param_shardings)


# ----------------------------------------------------------------- pairs ---

def test_pairs_from_real_records(data):
  train, train_stats = rm.pair_texts(data.all_train(), PAIRS, seed=SEED)
  eval_, eval_stats = rm.pair_texts(data.eval, PAIRS, seed=SEED + 1)
  by_id = {r['id']: r for r in data.all_train() + data.eval}
  for pairs, stats in ((train, train_stats), (eval_, eval_stats)):
    kinds = [p.kind for p in pairs]
    assert stats['chat'] == kinds.count('chat') > 20
    assert stats['verifiable'] == kinds.count('verifiable') > 50
    for p in pairs:
      assert (p.chosen_prompt, p.chosen) != (p.rejected_prompt, p.rejected)
      hi, lo = by_id[p.ids[0]], by_id[p.ids[1]]
      if p.kind == 'chat':
        # Two whole conversations of one topic, the higher-rated one chosen.
        assert hi['topic'] == lo['topic'] and hi['id'] != lo['id']
        assert hi['rating'] - lo['rating'] >= PAIRS.min_rating_gap
        assert p.chosen_prompt + [{'role': 'assistant', 'content': p.chosen}] == hi['messages']
        assert p.rejected_prompt + [{'role': 'assistant', 'content': p.rejected}] == lo['messages']
      else:
        # The task's own scorer: y⁺ right, y⁻ wrong; only the answer differs.
        assert hi is lo and p.chosen_prompt == p.rejected_prompt == hi['messages'][:1]
        assert reasoning_gym_math.score(hi, p.chosen) == 1.0
        assert reasoning_gym_math.score(hi, p.rejected) == 0.0
        cut = p.chosen.rindex('<answer>')
        assert p.rejected[:cut] == p.chosen[:cut]
        wrong = int(reasoning_gym_math.extract_answer(p.rejected))
        right = int(hi['answer'])
        assert 1 <= abs(wrong - right) <= 9 and (wrong < 0) == (right < 0)
  # No leak: no eval pair shares a record or a scored sequence with a train pair.
  train_ids = {i for p in train for i in p.ids}
  assert not train_ids & {i for p in eval_ for i in p.ids}
  seqs = lambda ps: {json.dumps([q.chosen_prompt, q.chosen]) for q in ps} | {
      json.dumps([q.rejected_prompt, q.rejected]) for q in ps}
  assert not seqs(train) & seqs(eval_)
  # chitchat's unrated conversations make no pairs and are counted.
  assert train_stats['chat_unrated'] == sum(
      r['rating'] is None for r in data.train['chat'])


def test_wrong_answer():
  rng = np.random.default_rng(0)
  for value in (0, 3, 9, 10, 57, -1, -4, -30):
    for _ in range(50):
      wrong = int(rm.wrong_answer(str(value), rng, []))
      assert 1 <= abs(wrong - value) <= 9 and (wrong < 0) == (value < 0)
  assert rm.wrong_answer('x + 1', rng, ['x + 1', 'x - 1']) == 'x - 1'
  assert rm.wrong_answer('x', rng, ['x']) is None


def test_pairs_take_and_iterator_resume():
  texts = [None] * 10
  arrays = {'kind': np.arange(10, dtype=np.int32), 'x': np.arange(10)[:, None] * np.ones((1, 3))}
  pairs = rm.Pairs(arrays, {}, texts)
  np.testing.assert_array_equal(pairs.take(7, 4, seed=1)['x'], pairs.take(7, 4, seed=1)['x'])
  # One epoch visits every pair once.
  epoch = np.concatenate([pairs.take(s, 5, seed=1)['kind'] for s in range(2)])
  assert sorted(epoch.tolist()) == list(range(10))
  it = rm.PairIterator(pairs, 4, seed=1)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = next(it)
  resumed = rm.PairIterator(pairs, 4, seed=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['kind'], want['kind'])


# ------------------------------------------------------------------ head ---

def test_head_reads_normalised_state_at_last_index(model_config):
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  spec = state_lib.model_spec(model_config, mesh, RULES)
  params = random_params(spec, 0)
  rng = np.random.default_rng(0)
  b, t, v = 4, 12, 7
  inputs = rng.integers(1, model_config.vocab_size, (b, t)).astype(np.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  last = np.array([11, 0, 5, 8], np.int32)
  # With w = the tied embedding row of token v and b = 0, the head reads what
  # the LM head reads: r must equal the logit of v at the last real token.
  head = {'w': params['embed_vd'][v], 'b': jnp.zeros(())}
  reward = functools.partial(jax.jit(rm.rewards, static_argnames='spec'), spec=spec)
  r = np.asarray(reward(params, head, inputs, positions, last))
  logits = jax.jit(lambda p, x, pos: state_lib.merge(spec, p)(x, pos).logits)(
      params, inputs, positions)
  np.testing.assert_allclose(r, np.asarray(logits)[np.arange(b), last, v], rtol=1e-5, atol=1e-5)
  # Tokens after last_index do not matter; the token at it does.
  after = inputs.copy()
  for i in range(b):
    after[i, last[i] + 1:] = rng.integers(1, model_config.vocab_size, t - last[i] - 1)
  np.testing.assert_allclose(reward(params, head, after, positions, last), r, rtol=1e-6)
  at = inputs.copy()
  at[np.arange(b), last] = (at[np.arange(b), last] % (model_config.vocab_size - 1)) + 1
  assert np.all(np.abs(np.asarray(reward(params, head, at, positions, last)) - r) > 1e-6)


# ------------------------------------------------------------ train step ---

def random_pair_batch(seed, vocab, rows=8, length=16):
  rng = np.random.default_rng(seed)
  batch = {'kind': rng.integers(0, 2, rows).astype(np.int32)}
  for side in ('chosen', 'rejected'):
    batch[f'{side}_inputs'] = rng.integers(1, vocab, (rows, length)).astype(np.int32)
    batch[f'{side}_positions'] = np.broadcast_to(np.arange(length, dtype=np.int32),
                                                 (rows, length)).copy()
    batch[f'{side}_last_index'] = rng.integers(3, length, rows).astype(np.int32)
  return batch


def run_steps(mesh_shape, devices, model_config, steps=2):
  mesh = sharding.make_mesh(mesh_shape, devices)
  with jax.set_mesh(mesh):
    spec = state_lib.model_spec(model_config, mesh, RULES)
    tx, schedule = make_optimizer(common.optim(lr=1e-2, warmup_steps=1), 10)
    state, shardings = state_lib.init_train_state(
        spec, random_params(spec, 0), tx, mesh, 0,
        extras={'head': rm.init_head(model_config.d_model, 0)})
    bs = sharding.batch_sharding(mesh, RULES)
    step = rm.jit_train_step(spec, tx, schedule, shardings, bs)
    history = []
    for i in range(steps):
      batch = random_pair_batch(i, model_config.vocab_size)
      state, metrics = step(state, sharding.shard_batch(batch, bs))
      history.append(jax.device_get(metrics))
    assert step._cache_size() == 1  # no recompilation after the first step
    return history, jax.device_get({'params': state['params'], 'head': state['head']})


def test_sharded_step_equals_single_device(model_config):
  history, trained = run_steps((2, 2, 2), jax.devices(), model_config)
  ref_history, ref_trained = run_steps((1, 1, 1), jax.devices()[:1], model_config)
  for key in ('loss', 'accuracy', 'margin', 'accuracy/chat', 'accuracy/verifiable', 'grad_norm'):
    np.testing.assert_allclose([h[key] for h in history], [h[key] for h in ref_history],
                               rtol=1e-4, atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), trained, ref_trained)
  # The head's w is trained with the backbone; BT is blind to the bias b
  # (it cancels in r⁺ - r⁻), so b gets no gradient and stays 0.
  init_w = np.asarray(rm.init_head(trained['head']['w'].shape[0], 0)['w'])
  assert np.abs(trained['head']['w'] - init_w).max() > 1e-3
  assert float(trained['head']['b']) == 0.0


# ------------------------------------------------------------- the stage ---

@pytest.fixture(scope='module')
def trained(tokenizer, model_config, tmp_path_factory):
  """A short run: 400 reasoning-gym pairs and a few chat pairs, the last 32
  tokens of each side (the trace's last line and the answer)."""
  root = tmp_path_factory.mktemp('rm')
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  spec = state_lib.model_spec(model_config, mesh, RULES)
  init_path = str(root / 'init')
  checkpoint.save_params(init_path, random_params(spec, 1))
  cfg = ConfigDict(dict(
      name='reward_model', kind='reward_model', model='rm', init_from=init_path, steps=200,
      batch_size=16, seq_len=32, grad_accum=1,
      optim=common.optim(lr=3e-3, warmup_steps=10, weight_decay=0.0),
      data=data_config(100, 100), eval=ConfigDict(dict(batch_size=64)), pairs=PAIRS,
      checkpoint_every=100, log_every=20))
  stage_dir = str(root / 'stage')
  os.makedirs(stage_dir)
  ctx = loop.StageContext(
      name='reward_model', stage_dir=stage_dir, mesh=mesh, rules=RULES, tokenizer=tokenizer,
      seed=SEED, data_seed=SEED, models={'rm': model_config}, eval_records=[],
      init_params_path=init_path)
  with jax.set_mesh(mesh):
    result = rm.run(cfg, ctx)
  return cfg, ctx, result


def test_short_run_learns_held_out_verifiable_pairs(trained):
  cfg, ctx, result = trained
  metrics = result['eval']
  print(metrics)
  assert metrics['eval_pairs/verifiable'] == 100 and metrics['eval_pairs/chat'] > 0
  assert metrics['eval_pairs'] == metrics['eval_pairs/verifiable'] + metrics['eval_pairs/chat']
  assert metrics['pairwise_accuracy/verifiable'] >= 0.7
  assert 0.0 <= metrics['pairwise_accuracy/chat'] <= 1.0
  losses = [h['loss'] for h in result['history']]
  assert np.mean(losses[-3:]) < 0.5 * losses[0]
  assert result['steps'] == cfg.steps
  assert os.path.isdir(os.path.join(ctx.stage_dir, 'final'))
  with open(os.path.join(ctx.stage_dir, rm.INFO_FILE)) as f:
    info = json.load(f)
  assert info['seq_len'] == 32 and info['reward_std'] > 0


def test_load_scorer_round_trip(trained, tokenizer, model_config, data):
  cfg, ctx, result = trained
  mesh = ctx.mesh
  with jax.set_mesh(mesh):
    scorer = rm.load_scorer(ctx.stage_dir, model_config, tokenizer, mesh, RULES, batch_size=16)
    # In-training scoring: the stage's own eval rows, fixed length seq_len.
    _, eval_pairs = rm.stage_pairs(stage_data.load(cfg.data, seed=SEED), cfg, tokenizer,
                                   seed=SEED)
    spec = state_lib.model_spec(model_config, mesh, RULES)
    final = checkpoint.load_params(os.path.join(ctx.stage_dir, 'final'),
                                   {'params': state_lib.abstract_params(spec),
                                    'head': jax.tree.map(jnp.asarray, scorer.head)})
    side = {k: eval_pairs.arrays[f'chosen_{k}'] for k in ('inputs', 'positions', 'last_index')}
    want = rm.score_rows(rm.jit_rewards(spec, mesh, RULES), final['params'], final['head'],
                         side, 64)
    # The scorer: from text, bucketed lengths, batches of 16.
    got = scorer([p.chosen_prompt for p in eval_pairs.texts],
                 [p.chosen for p in eval_pairs.texts])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    rejected = scorer([p.rejected_prompt for p in eval_pairs.texts],
                      [p.rejected for p in eval_pairs.texts])
    assert np.mean(got > rejected) == pytest.approx(result['eval']['pairwise_accuracy'])
    # The final/ path works as well; another tokenizer is refused.
    again = rm.load_scorer(os.path.join(ctx.stage_dir, 'final'), model_config, tokenizer, mesh,
                           RULES, batch_size=16)
    few = eval_pairs.texts[:3]
    np.testing.assert_allclose(again([p.chosen_prompt for p in few], [p.chosen for p in few]),
                               got[:3], rtol=1e-6)

    class OtherTokenizer:
      def fingerprint(self):
        return 'other'

    with pytest.raises(ValueError, match='trained with tokenizer'):
      rm.load_scorer(ctx.stage_dir, model_config, OtherTokenizer(), mesh, RULES)

    # As a reward function: standardised by the held-out stats, tanh-squashed;
    # records outside `tasks` are not applicable.
    records = [r for r in data.eval if r['task'] == 'chain_sum'][:3] + [
        next(r for r in data.eval if r['task'] == 'chat')]
    completions = [r['messages'][-1]['content'] for r in records]
    fn = rm.preference_reward(scorer, tasks=('chain_sum',))
    out = fn(['ignored'] * 4, completions, records=records, truncated=[False] * 4)
    assert out[3] is None
    raw = scorer([stage_data.eval_input(r) for r in records[:3]], completions[:3])
    np.testing.assert_allclose(out[:3], np.tanh((raw - scorer.mean) / scorer.std), rtol=1e-6)
