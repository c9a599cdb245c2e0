"""The train state's per-device bytes shrink as 1/fsdp (experiments/memory_scaling.py)."""

import jax
import pytest

from experiments import memory_scaling


def test_train_state_bytes_shrink_with_fsdp():
  # Wide enough that the replicated norm scales and counters are a sliver.
  cfg = memory_scaling.model_config(d_model=256, num_layers=2, vocab_size=512)
  rows = memory_scaling.scaling_table(cfg, [1, 2, 4], jax.devices()[:4])
  for row in rows:
    # Params and both Adam moments, each sharded: within 10% of 1/fsdp.
    assert row['params_ratio'] == pytest.approx(1 / row['fsdp'], rel=0.1), row
    assert row['opt_state_ratio'] == pytest.approx(1 / row['fsdp'], rel=0.1), row
    assert row['off_ideal'] < 0.1, row
  assert '| 4 | (1, 4, 1) |' in memory_scaling.markdown(rows, cfg)


def test_fsdp_must_divide_the_devices():
  cfg = memory_scaling.model_config(d_model=64, num_layers=1, vocab_size=64)
  with pytest.raises(ValueError, match='fsdp=3'):
    memory_scaling.measure(cfg, 3, jax.devices()[:4])
