"""The default pipeline with rl_stem rewarded (and pass-rate filtered) by
`sound_stem`: full marks only for a right answer whose reasoning's arithmetic
claims are all true (README: "RL recipe probes").

  python -m pipeline.main --config=configs/rl_probe_sound_stem.py --workdir=runs/probe \
      --config.stop_after=rl_stem
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config(arg)
  with config.unlocked():
    config.stages[3].rewards.functions = {'sound_stem': 1.0, 'format': 0.1, 'overlong': 0.1}
  return config
