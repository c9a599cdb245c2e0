"""Ahead-of-time compile of the train steps on a virtual mesh (experiments/aot_compile.py)."""

import jax
import numpy as np
import pytest

from configs import common
from experiments import aot_compile
from pipeline import sharding
from pipeline import state as state_lib
from pipeline.optim import make_optimizer


def _shard_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh((1, 4, 2))  # 8 emulated devices (conftest)


def _cfg(**kw):
  return aot_compile.model_config('tiny', vocab_size=256, dtype='bfloat16', **kw)


def test_compiles_every_step_and_reports_per_device_memory(mesh):
  model = _cfg(remat='dots', scan_layers=True)
  results = aot_compile.compile_steps(model, model, mesh, common.DEFAULT_RULES, batch_size=8,
                                      seq_len=32)
  assert set(results) == {'sft', 'distill', 'grpo'}
  # The SFT step's arguments are exactly one device's shards of the state
  # (params and both Adam moments sharded by the rules) and of the batch.
  spec = state_lib.model_spec(model, mesh, common.DEFAULT_RULES)
  tx, _ = make_optimizer(common.optim(), total_steps=1000)
  state = state_lib.abstract_train_state(spec, tx, mesh)
  batch_bytes = 5 * (8 // 4) * 32 * 4  # five int32/float32 [B, T] arrays, B over fsdp=4
  sft = results['sft']
  assert sft['argument_bytes'] == _shard_bytes(state) + batch_bytes
  # The state is donated: the new state reuses the old one's buffers.
  assert sft['alias_bytes'] >= _shard_bytes(state) - 64
  for name, m in results.items():
    assert m['temp_bytes'] > 0, name
    assert m['peak_bytes'] >= m['argument_bytes'], name
  assert '| distill |' in aot_compile.markdown(results, 'header')


def test_bad_arguments_are_errors(mesh):
  with pytest.raises(ValueError, match='batch_size=6'):
    aot_compile.compile_steps(_cfg(remat='off', scan_layers=False), _cfg(remat='off', scan_layers=False),
                              mesh, common.DEFAULT_RULES, batch_size=6, seq_len=8)
  with pytest.raises(ValueError, match='unknown names'):
    aot_compile.compile_steps(_cfg(remat='off', scan_layers=False), _cfg(remat='off', scan_layers=False),
                              mesh, common.DEFAULT_RULES, batch_size=8, seq_len=8, steps=('ppo',))
  with pytest.raises(ValueError, match='not a preset'):
    aot_compile.model_config('70b', vocab_size=8, dtype='float32', remat='off', scan_layers=False)
