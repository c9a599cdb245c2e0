"""Probe: can the default teacher learn level-0 arithmetic in the cold-start budget?

  python -m pipeline.main --config=configs/math_probe.py --workdir=/tmp/math_probe
  python -m pipeline.main --config=configs/math_probe.py:tiny --workdir=/tmp/probe_tiny  # < 1 min

One SFT stage shaped like configs/default.py's cold_start_sft: the same teacher
(d128, 4 layers, ~0.9M parameters), 500 steps of 16 x 256 tokens, math
(basic_arithmetic + chain_sum, levels 0-1) at a 50% share, gcd at 30% and code
at 20%, level 1 unlocked after 40% of the steps. Only the held-out math set is
larger (100 items per task, 50 per level) so per-level accuracies mean
something. Expected on CPU (2 cores, ~13 min when shared): level-0 accuracy
0.68 on basic_arithmetic and 0.76 on chain_sum with the digit-level traces of
data/sources/reasoning_gym_math.py (chain_sum 0.08 with one-line-per-operation
traces); level 1 0.04 and 0.25, room for later stages. The summary reports per
task (levels 0 and 1 together): 0.33 and 0.46.
"""

from configs import common
from configs.default import MATH_TASKS, STEM_TASKS


def get_config(arg: str | None = None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f"configs/math_probe.py takes '' or 'tiny', got {arg!r}")
  tiny = arg == 'tiny'
  config = common.base(vocab_size=512 if tiny else 1024)
  if tiny:
    config.models.teacher = common.model(d_model=32, num_layers=2, num_heads=2,
                                         num_kv_heads=1, mlp_dim=64)
    steps, batch, seq_len, n_train, n_eval, n_math_eval = 8, 8, 128, 100, 4, 4
  else:
    config.models.teacher = common.model(d_model=128, num_layers=4, num_heads=4,
                                         num_kv_heads=2, mlp_dim=384)
    steps, batch, seq_len, n_train, n_eval, n_math_eval = 500, 16, 256, 3000, 40, 100
  source = common.source
  sources = {
      'math': source('reasoning_gym', weight=0.5, train_size=n_train, eval_size=n_math_eval,
                     task_names=MATH_TASKS, levels=(0, 1)),
      'stem': source('reasoning_gym', weight=0.3, train_size=n_train, eval_size=n_eval,
                     task_names=STEM_TASKS, levels=(0, 1)),
      'code': source('code_tasks', weight=0.2, train_size=n_train, eval_size=n_eval,
                     levels=(0, 1)),
  }
  config.stages = [
      common.sft_stage('math_sft', model='teacher', steps=steps, batch_size=batch,
                       seq_len=seq_len, sources=sources, lr=3e-3,
                       curriculum=((0.0, 0), (0.4, 1)),
                       eval_max_new_tokens=16 if tiny else 192),
  ]
  return common.lock(config)
