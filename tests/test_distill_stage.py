"""The distillation stage's wiring: a sharded step equals a single-device
step, the teacher gets no update, levels switch off by weight, pairs resume
deterministically, student-from-teacher-layers, tokenizer mismatch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from models.llama import ModelConfig
from pipeline import checkpoint, distill, sharding
from pipeline import state as state_lib
from pipeline.optim import make_optimizer

TEACHER = ModelConfig(vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=64)
STUDENT = ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=8, mlp_dim=32)
RULES = common.DEFAULT_RULES


def loss_config(**weights):
  cfg = common.distill_loss(**weights)
  return distill._loss_config(cfg, STUDENT, TEACHER)


def batches(seed, rows=8, length=16):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, 64, (rows, length)).astype(np.int32)
  batch = {'inputs': inputs, 'targets': np.roll(inputs, -1, 1),
           'loss_mask': (rng.random((rows, length)) < 0.7).astype(np.float32),
           'segment_ids': np.ones((rows, length), np.int32),
           'positions': np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))}
  pairs = {}
  for side in ('chosen', 'rejected'):
    ids = rng.integers(1, 64, (rows, length + 1)).astype(np.int32)
    pairs.update({f'{side}_inputs': ids[:, :-1], f'{side}_targets': ids[:, 1:],
                  f'{side}_positions': batch['positions'],
                  f'{side}_mask': np.concatenate([np.zeros((rows, 6)), np.ones((rows, length - 6))],
                                                 1).astype(np.float32)})
    pairs[f'ref_{side}'] = rng.normal(size=rows).astype(np.float32) - 30
  return batch, pairs


def run_steps(mesh_shape, devices, loss_cfg, steps=2):
  mesh = sharding.make_mesh(mesh_shape, devices)
  with jax.set_mesh(mesh):
    student = state_lib.model_spec(STUDENT, mesh, RULES)
    teacher = state_lib.model_spec(TEACHER, mesh, RULES)
    teacher_params = state_lib.init_params(teacher, seed=1)
    tx, schedule = make_optimizer(common.optim(lr=1e-2, warmup_steps=1), 10)
    projection = jnp.zeros((len(loss_cfg.layer_map), 16, 32))
    state, shardings = state_lib.init_train_state(student, state_lib.init_params(student, 0),
                                                  tx, mesh, 0, extras={'projection': projection})
    bs = sharding.batch_sharding(mesh, RULES)
    step = jax.jit(functools.partial(distill.train_step, student=student, teacher=teacher,
                                     tx=tx, schedule=schedule, loss_cfg=loss_cfg),
                   in_shardings=(shardings, teacher.param_shardings, bs, bs),
                   out_shardings=(shardings, None), donate_argnums=0)
    teacher_before = jax.device_get(teacher_params)
    history = []
    for i in range(steps):
      batch, pairs = batches(i)
      state, metrics = step(state, teacher_params, sharding.shard_batch(batch, bs),
                            sharding.shard_batch(pairs, bs))
      history.append(jax.device_get(metrics))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(teacher_params), teacher_before)
    return history, jax.device_get(state)


@pytest.fixture(scope='module')
def single():
  return run_steps((1, 1, 1), jax.devices()[:1], loss_config(ce_weight=0.5))


def test_all_levels_sharded_equals_single_device(single):
  history, state = run_steps((2, 2, 2), jax.devices(), loss_config(ce_weight=0.5))
  ref_history, ref_state = single
  for key in ('loss', 'ce', 'logit_kl', 'hidden', 'preference'):
    np.testing.assert_allclose([h[key] for h in history], [h[key] for h in ref_history],
                               rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               state['params'], ref_state['params'])
  # The projection W is trained with the student.
  assert np.abs(state['projection']).sum() > 0


def test_levels_switch_off_by_weight(single):
  history, _ = run_steps((1, 1, 1), jax.devices()[:1],
                         loss_config(ce_weight=0.0, logit_weight=1.0, hidden_weight=0.0,
                                     preference_weight=0.0))
  assert set(history[0]) >= {'logit_kl', 'loss'}
  assert not {'hidden', 'preference', 'ce'} & set(history[0])
  np.testing.assert_allclose(history[0]['loss'], history[0]['logit_kl'], rtol=1e-6)


def test_pairs_for_a_step_are_deterministic():
  arrays = {'ref_chosen': np.arange(10.0), 'x': np.arange(10)[:, None] * np.ones((1, 3))}
  pairs = distill.Pairs(arrays, {})
  a, b = pairs.take(7, 4), pairs.take(7, 4)
  np.testing.assert_array_equal(a['x'], b['x'])
  assert a['ref_chosen'].tolist() == [8.0, 9.0, 0.0, 1.0]  # wraps around


def test_student_from_teacher_layers():
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  wide_student = ModelConfig(**{**TEACHER.__dict__, 'num_layers': 2})
  student = state_lib.model_spec(wide_student, mesh, RULES)
  teacher = state_lib.model_spec(TEACHER, mesh, RULES)
  t_params = state_lib.init_params(teacher, 1)
  params = distill.init_from_teacher(student, teacher, t_params, ((1, 2), (2, 4)))
  np.testing.assert_array_equal(params['blocks'][0]['mlp']['w_up_df'],
                                t_params['blocks'][1]['mlp']['w_up_df'])
  np.testing.assert_array_equal(params['blocks'][1]['attn']['wq_dnh'],
                                t_params['blocks'][3]['attn']['wq_dnh'])
  with pytest.raises(ValueError, match=r"differ in \['d_model'"):
    distill.init_from_teacher(state_lib.model_spec(STUDENT, mesh, RULES), teacher, t_params,
                              ((1, 2), (2, 4)))


class FakeTokenizer:
  def __init__(self, fingerprint):
    self._fp = fingerprint

  def fingerprint(self):
    return self._fp


def test_tokenizer_mismatch_is_an_error(tmp_path):
  stage_dir = tmp_path / 'teacher_stage'
  stage_dir.mkdir()
  checkpoint.write_model_meta(str(stage_dir), FakeTokenizer('aaaa'), TEACHER)
  checkpoint.check_same_tokenizer(str(stage_dir / 'final'), FakeTokenizer('aaaa'))
  with pytest.raises(ValueError, match='must share a tokenizer'):
    checkpoint.check_same_tokenizer(str(stage_dir / 'final'), FakeTokenizer('bbbb'))


def test_on_policy_batches_are_the_students_samples():
  """GKD mode: rows are prompt + the student's own sample, the loss on the
  sample only; which steps and prompts is a function of (seed, step)."""
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  student = state_lib.model_spec(STUDENT, mesh, RULES)
  params = state_lib.init_params(student, 0)
  prompts = [np.array([1, 5, 6, 7], np.int32), np.array([1, 9, 9], np.int32)]
  on_policy = distill.OnPolicy(prompts=prompts, fraction=0.3,
                               sample_cfg=distill.sampling.SamplingConfig(max_new_tokens=6),
                               batch_size=4, seq_len=12, seed=3, end_id=2, pad_id=0)
  chosen = [on_policy.chosen(s) for s in range(2000)]
  assert 0.25 < np.mean(chosen) < 0.35
  assert chosen == [on_policy.chosen(s) for s in range(2000)]

  batch = on_policy.batch(student, params, step=5)
  again = on_policy.batch(student, params, step=5)
  for key in ('inputs', 'targets', 'positions', 'loss_mask', 'segment_ids'):
    assert batch[key].shape == (4, 12)
    np.testing.assert_array_equal(batch[key], again[key])
  for row in range(4):
    n = int(batch['segment_ids'][row].sum())
    prompt_len = 4 if batch['inputs'][row, 1] == 5 else 3
    # Targets are the inputs shifted by one; the loss covers the sample only.
    np.testing.assert_array_equal(batch['inputs'][row, 1:n], batch['targets'][row, :n - 1])
    assert batch['loss_mask'][row, :prompt_len - 1].sum() == 0
    assert batch['loss_mask'][row, prompt_len - 1:n].all()
    assert not batch['loss_mask'][row, n:].any()
