"""Ablation over the distillation levels, same seed, data and step budget.

  python -m experiments.distill_ablation --workdir=runs/distill_ablation
  python -m experiments.distill_ablation --workdir=runs/distill_ablation --steps=300 \
      --base=runs/default   # reuse a finished default run's teacher
  python -m experiments.distill_ablation --workdir=/tmp/abl --config=configs/default.py:tiny

The teacher is trained once (the config's stages before distill, in
`<workdir>/base`; an existing `<workdir>/base` is resumed, and --base copies a
finished run's stages there instead of retraining the teacher);
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
import subprocess
import sys

from absl import app, flags

from pipeline import runner

_WORKDIR = flags.DEFINE_string('workdir', 'runs/distill_ablation', 'Output folder.')
_CONFIG = flags.DEFINE_string('config', 'configs/default.py', 'Pipeline config (with a distill stage).')
_EXTRA = flags.DEFINE_multi_string('override', [], 'Extra --config.* overrides for every run.')
_STEPS = flags.DEFINE_integer('steps', None, "Distill steps of every variant (the step "
                              "budget); default: the config's.")
_BASE = flags.DEFINE_string('base', None, 'A finished run of the same config whose stages '
                            'before distill are copied into <workdir>/base (no retraining).')

# (name, ce, logit, hidden, preference) weights.
VARIANTS = (
    ('pipeline_default', 1.0, 1.0, 0.1, 0.5),  # configs/common.distill_loss's defaults
    ('student_sft_only', 1.0, 0.0, 0.0, 0.0),
    ('logit_only', 0.0, 1.0, 0.0, 0.0),
    ('hidden_only', 0.0, 0.0, 1.0, 0.0),
    ('preference_only', 0.0, 0.0, 0.0, 1.0),
    ('logit_hidden', 0.0, 1.0, 1.0, 0.0),
    ('all_three', 0.0, 1.0, 1.0, 1.0),
)
COLUMNS = ('accuracy', 'pass@1/code_gen', 'call_accuracy/agent', 'perplexity/chat')


def _distill_stage(config_path: str) -> tuple[int, list[str]]:
  """Index of the config's distill stage, and the names of all stages."""
  path, _, arg = config_path.partition(':')
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  stages = module.get_config(arg or None).stages
  kinds = [s.kind for s in stages]
  if 'distill' not in kinds[1:]:
    raise ValueError(f'{config_path} needs a distill stage after a teacher stage '
                     f'(stages: {kinds})')
  return kinds.index('distill'), [s.name for s in stages]


def _run(workdir: str, overrides: list[str]) -> None:
  cmd = [sys.executable, '-m', 'pipeline.main', f'--config={_CONFIG.value}',
         f'--workdir={workdir}', *overrides, *_EXTRA.value]
  print('$', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def main(argv):
  del argv
  index, names = _distill_stage(_CONFIG.value)
  name, teacher_stage, dropped = names[index], names[index - 1], names[index:]
  root = _WORKDIR.value
  base = os.path.join(root, 'base')
  if _BASE.value:
    runner.copy_run_without(_BASE.value, base, dropped)
  # The base run: the stages before distill (the teacher).
  _run(base, [f'--config.stop_after={teacher_stage}'])
  budget = [f'--config.stages.{index}.steps={_STEPS.value}'] if _STEPS.value else []
  eval_every = max((_STEPS.value or 500) // 6, 1)
  rows = []
  for variant, ce, logit, hidden, pref in VARIANTS:
    workdir = os.path.join(root, variant)
    runner.copy_run_without(base, workdir, dropped)
    s = f'--config.stages.{index}'
    _run(workdir, [f'{s}.loss.ce_weight={ce}', f'{s}.loss.logit_weight={logit}',
                   f'{s}.loss.hidden_weight={hidden}', f'{s}.loss.preference_weight={pref}',
                   f'{s}.eval.during_training=60', f'{s}.eval.eval_every={eval_every}',
                   f'--config.stop_after={name}', *budget])
    with open(os.path.join(workdir, 'summary.json')) as f:
      stage = next(s for s in json.load(f)['stages'] if s['name'] == name)
    with open(os.path.join(workdir, name, 'history.json')) as f:
      history = json.load(f)
    rows.append({'variant': variant, 'weights': dict(ce=ce, logit=logit, hidden=hidden,
                                                     preference=pref),
                 'eval': stage['eval'], 'wall_s': stage['wall_s'],
                 'final_loss': [h['loss'] for h in history if 'loss' in h][-1],
                 'curve': [(h['step'], h['eval/accuracy']) for h in history
                           if 'eval/accuracy' in h]})
  with open(os.path.join(root, 'base', 'summary.json')) as f:
    teacher_eval = next(s for s in json.load(f)['stages'] if s['name'] == teacher_stage)['eval']
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
                 f" | {fmt(r['final_loss'])} | {r['wall_s']:.0f} |")
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
