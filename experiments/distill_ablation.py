"""Ablation over the distillation levels, same seed, data and step budget.

  python -m experiments.distill_ablation --workdir=runs/distill_ablation
  python -m experiments.distill_ablation --workdir=/tmp/abl --config=configs/default.py:tiny

The teacher is trained once (the config's SFT stages, in `<workdir>/base`; an
existing `<workdir>/base` is resumed, so a finished default run's SFT stages
can be copied there to skip retraining the teacher);
each variant is a copy of that run whose distill stage is re-run with the
levels switched by config overrides only, e.g.
`--config.stages.2.loss.hidden_weight=0`. The runner skips the finished SFT
stages, so every variant distils from the very same teacher and tokenizer.

Writes <workdir>/ablation.md (held-out metrics per domain, final losses, wall
time), ablation.json, and ablation.png (held-out accuracy against steps).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', 'runs/distill_ablation', 'Output folder.')
_CONFIG = flags.DEFINE_string('config', 'configs/default.py', 'Pipeline config (with a distill stage).')
_EXTRA = flags.DEFINE_multi_string('override', [], 'Extra --config.* overrides for every run.')

# (name, ce, logit, hidden, preference) weights.
VARIANTS = (
    ('student_sft_only', 1.0, 0.0, 0.0, 0.0),
    ('logit_only', 0.0, 1.0, 0.0, 0.0),
    ('hidden_only', 0.0, 0.0, 1.0, 0.0),
    ('preference_only', 0.0, 0.0, 0.0, 1.0),
    ('logit_hidden', 0.0, 1.0, 1.0, 0.0),
    ('all_three', 0.0, 1.0, 1.0, 1.0),
)
COLUMNS = ('accuracy', 'pass@1/code_gen', 'call_accuracy/agent', 'perplexity/chat')


def _distill_index(config_path: str) -> tuple[int, str]:
  """Index and name of the config's distill stage."""
  path, _, arg = config_path.partition(':')
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  stages = module.get_config(arg or None).stages
  kinds = [s.kind for s in stages]
  if 'distill' not in kinds:
    raise ValueError(f'{config_path} has no distill stage (stages: {kinds})')
  return kinds.index('distill'), stages[kinds.index('distill')].name


def _run(workdir: str, overrides: list[str]) -> None:
  cmd = [sys.executable, '-m', 'pipeline.main', f'--config={_CONFIG.value}',
         f'--workdir={workdir}', *overrides, *_EXTRA.value]
  print('$', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def _copy_teacher_run(base: str, target: str, distill_name: str) -> None:
  """A variant starts as the base run minus its distill stage."""
  if os.path.exists(os.path.join(target, 'summary.json')):
    return  # resuming the ablation
  shutil.copytree(base, target, ignore=shutil.ignore_patterns(distill_name))
  with open(os.path.join(target, 'summary.json')) as f:
    summary = json.load(f)
  for stage in summary['stages']:
    if stage['name'] == distill_name:
      stage.update(status='pending', steps=0, wall_s=0.0, eval={})
  with open(os.path.join(target, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)


def main(argv):
  del argv
  index, name = _distill_index(_CONFIG.value)
  root = _WORKDIR.value
  base = os.path.join(root, 'base')
  # The base run: SFT stages + the default distill stage (its levels as configured).
  _run(base, [f'--config.stages.{index}.eval.during_training=60',
              f'--config.stages.{index}.eval.eval_every=50', f'--config.stop_after={name}'])
  rows = []
  for variant, ce, logit, hidden, pref in VARIANTS:
    workdir = os.path.join(root, variant)
    _copy_teacher_run(base, workdir, name)
    s = f'--config.stages.{index}'
    _run(workdir, [f'{s}.loss.ce_weight={ce}', f'{s}.loss.logit_weight={logit}',
                   f'{s}.loss.hidden_weight={hidden}', f'{s}.loss.preference_weight={pref}',
                   f'{s}.eval.during_training=60', f'{s}.eval.eval_every=50',
                   f'--config.stop_after={name}'])
    with open(os.path.join(workdir, 'summary.json')) as f:
      stage = next(s for s in json.load(f)['stages'] if s['name'] == name)
    with open(os.path.join(workdir, name, 'history.json')) as f:
      history = json.load(f)
    rows.append({'variant': variant, 'weights': dict(ce=ce, logit=logit, hidden=hidden,
                                                     preference=pref),
                 'eval': stage['eval'], 'wall_s': stage['wall_s'],
                 'curve': [(h['step'], h['eval/accuracy']) for h in history
                           if 'eval/accuracy' in h]})
  with open(os.path.join(root, 'base', 'summary.json')) as f:
    teacher_eval = [s for s in json.load(f)['stages'] if s['name'] != name][-1]['eval']
  write_outputs(root, rows, teacher_eval)


def write_outputs(root: str, rows: list[dict], teacher_eval: dict) -> None:
  lines = ['| variant | ce / logit / hidden / pref | ' + ' | '.join(COLUMNS) +
           ' | final loss | wall s |', '|' + '---|' * (len(COLUMNS) + 4)]
  fmt = lambda v: f'{v:.3f}' if isinstance(v, float) else str(v)
  lines.append('| teacher (overall_sft) | - | ' +
               ' | '.join(fmt(teacher_eval.get(c, '-')) for c in COLUMNS) + ' | - | - |')
  for r in rows:
    w = r['weights']
    lines.append(f"| {r['variant']} | {w['ce']:g} / {w['logit']:g} / {w['hidden']:g} / "
                 f"{w['preference']:g} | " +
                 ' | '.join(fmt(r['eval'].get(c, '-')) for c in COLUMNS) +
                 f" | {fmt(r['eval'].get('final_loss', '-'))} | {r['wall_s']:.0f} |")
  table = '\n'.join(lines) + '\n'
  print(table)
  with open(os.path.join(root, 'ablation.md'), 'w') as f:
    f.write(table)
  with open(os.path.join(root, 'ablation.json'), 'w') as f:
    json.dump({'teacher': teacher_eval, 'variants': rows}, f, indent=2)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    if r['curve']:
      steps, acc = zip(*r['curve'])
      ax.plot(steps, acc, marker='o', label=r['variant'])
  ax.axhline(teacher_eval.get('accuracy', 0.0), color='k', ls='--', label='teacher')
  ax.set_xlabel('distillation step')
  ax.set_ylabel('held-out math accuracy (subset)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(root, 'ablation.png'), dpi=120)


if __name__ == '__main__':
  app.run(main)
