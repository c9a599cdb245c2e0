"""The SFT train step: sharded runs equal single-device runs, gradient
accumulation equals the full batch, no recompilation, schedules."""

import jax
import numpy as np
import pytest

from configs import common
from models.llama import ModelConfig
from pipeline import sharding
from pipeline import state as state_lib
from pipeline.optim import make_optimizer, make_schedule
from pipeline.sft import jit_train_step

CFG = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)
RULES = common.DEFAULT_RULES


def random_batch(seed, batch=8, length=32):
  """Two packed documents per row, the first shorter, plus trailing padding."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, CFG.vocab_size, (batch, length)).astype(np.int32)
  targets = np.roll(inputs, -1, axis=1)
  seg = np.zeros((batch, length), np.int32)
  pos = np.zeros((batch, length), np.int32)
  for r in range(batch):
    cut, end = rng.integers(4, 12), rng.integers(20, length)
    seg[r, :cut], seg[r, cut:end] = 1, 2
    pos[r, :cut], pos[r, cut:end] = np.arange(cut), np.arange(end - cut)
  mask = ((seg > 0) & (rng.random((batch, length)) < 0.7)).astype(np.float32)
  return {'inputs': inputs, 'targets': targets, 'loss_mask': mask, 'segment_ids': seg,
          'positions': pos}


def train(mesh_shape, devices, steps=2, accum=1):
  mesh = sharding.make_mesh(mesh_shape, devices)
  with jax.set_mesh(mesh):
    spec = state_lib.model_spec(CFG, mesh, RULES)
    params = state_lib.init_params(spec, seed=0)
    tx, schedule = make_optimizer(common.optim(lr=1e-2, warmup_steps=1), 10)
    state, shardings = state_lib.init_train_state(spec, params, tx, mesh, seed=0)
    batch_sharding = sharding.batch_sharding(mesh, RULES)
    step = jit_train_step(spec, tx, schedule, accum, shardings, batch_sharding)
    losses = []
    for i in range(steps):
      state, metrics = step(state, sharding.shard_batch(random_batch(i), batch_sharding))
      losses.append(float(metrics['loss']))
    return losses, jax.device_get(state['params']), step, state


@pytest.fixture(scope='module')
def single_device():
  return train((1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize('mesh_shape', [(1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_matches_single_device(single_device, mesh_shape):
  losses, params, _, state = train(mesh_shape, jax.devices())
  ref_losses, ref_params, _, _ = single_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, ref_params)
  # The parameters really are split across devices, not replicated.
  wq = state['params']['blocks'][0]['attn']['wq_dnh']
  assert len(wq.sharding.device_set) == 8
  assert wq.addressable_shards[0].data.size < wq.size


def test_grad_accumulation_equals_full_batch(single_device):
  losses, params, _, _ = train((1, 1, 1), jax.devices()[:1], accum=4)
  ref_losses, ref_params, _, _ = single_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, ref_params)


def test_no_recompilation_after_first_step():
  _, _, step, _ = train((2, 2, 2), jax.devices(), steps=1)
  compiled_after_first = step._cache_size()
  _, _, step2, state = train((2, 2, 2), jax.devices(), steps=1)
  del step2
  mesh = sharding.make_mesh((2, 2, 2))
  batch_sharding = sharding.batch_sharding(mesh, RULES)
  with jax.set_mesh(mesh):
    for i in range(3):
      state, _ = step(state, sharding.shard_batch(random_batch(10 + i), batch_sharding))
  assert compiled_after_first == 1
  assert step._cache_size() == 1


def test_loss_decreases_on_a_repeated_batch():
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with jax.set_mesh(mesh):
    spec = state_lib.model_spec(CFG, mesh, RULES)
    tx, schedule = make_optimizer(common.optim(lr=1e-2, warmup_steps=1), 30)
    state, shardings = state_lib.init_train_state(spec, state_lib.init_params(spec, 0), tx,
                                                  mesh, seed=0)
    bs = sharding.batch_sharding(mesh, RULES)
    step = jit_train_step(spec, tx, schedule, 1, shardings, bs)
    batch = sharding.shard_batch(random_batch(0), bs)
    state, first = step(state, batch)
    for _ in range(20):
      state, metrics = step(state, batch)
    assert float(metrics['loss']) < 0.5 * float(first['loss'])


@pytest.mark.parametrize('schedule', ['cosine', 'wsd', 'constant'])
def test_schedules_warm_up_then_decay(schedule):
  cfg = common.optim(lr=1.0, warmup_steps=10, schedule=schedule)
  fn = make_schedule(cfg, 100)
  lrs = np.array([float(fn(s)) for s in range(101)])  # lrs[100]: after the last step
  assert lrs[0] == 0.0 and np.isclose(lrs[10], 1.0)
  assert np.all(np.diff(lrs[:11]) > 0)
  if schedule == 'constant':
    assert np.allclose(lrs[10:], 1.0)
  else:
    assert np.isclose(lrs[-1], 0.1, atol=0.02) and np.all(np.diff(lrs[10:]) <= 1e-7)
  if schedule == 'wsd':  # stable until the last 20% of the post-warm-up steps
    assert np.allclose(lrs[10:82], 1.0)


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match="optim.schedule='linear'"):
    make_schedule(common.optim(schedule='linear'), 10)
