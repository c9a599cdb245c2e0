"""The default four-stage pipeline at CPU scale.

  python -m pipeline.main --config=configs/default.py --workdir=runs/default
  python -m pipeline.main --config=configs/default.py:tiny --workdir=/tmp/tiny  # < 1 min

Stages so far: cold-start SFT then overall SFT of the teacher on reasoning-gym
math with step-by-step traces.
"""

from configs import common

MATH_TASKS = ('basic_arithmetic', 'chain_sum', 'gcd')


def get_config(arg: str | None = None):
  tiny = arg == 'tiny'
  if arg not in (None, '', 'tiny'):
    raise ValueError(f"configs/default.py takes '' or 'tiny', got {arg!r}")
  config = common.base(vocab_size=512 if tiny else 1024)
  if tiny:
    config.models.teacher = common.model(d_model=32, num_layers=2, num_heads=2,
                                         num_kv_heads=1, mlp_dim=64)
    steps, batch, seq_len, train_size, eval_size = 8, 8, 128, 100, 4
  else:
    config.models.teacher = common.model(d_model=128, num_layers=4, num_heads=4,
                                         num_kv_heads=2, mlp_dim=384)
    steps, batch, seq_len, train_size, eval_size = 600, 16, 256, 4000, 50
  math = common.reasoning_gym_source(MATH_TASKS, train_size=train_size, eval_size=eval_size)
  config.stages = [
      common.sft_stage('cold_start_sft', model='teacher', steps=steps, batch_size=batch,
                       seq_len=seq_len, sources={'math': math}, lr=3e-3,
                       eval_max_new_tokens=16 if tiny else 96),
      common.sft_stage('overall_sft', model='teacher', steps=steps // 2, batch_size=batch,
                       seq_len=seq_len, sources={'math': math}, lr=1e-3,
                       eval_max_new_tokens=16 if tiny else 96),
  ]
  return common.lock(config)
